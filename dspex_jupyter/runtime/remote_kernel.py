"""The kernel class remote kernelspecs name (gateway_provisioners' ``--kernel-class-name``).

It is ipykernel's own kernel with the dspex comm target registered as it starts, so a kernel
in a pod or on an SSH host answers dspex ops from its first message, and the kernelspec (or
the pod's ``KERNEL_CLASS_NAME``) says it runs the dspex runtime. Imported only by the
launcher inside such a kernel: the runtime package itself stays free of ipykernel imports.
"""

from __future__ import annotations

from typing import Any

from ipykernel.ipkernel import IPythonKernel


class DspexKernel(IPythonKernel):
    """IPythonKernel plus ``dspex_jupyter.runtime.install()`` (idempotent: the pool's
    bootstrap code calls it again, harmlessly)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from .kernel import install

        install()
