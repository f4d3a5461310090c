"""A kernel provisioner that shows the pool only the provisioner API, as one for kernels on
another machine would: the kernel runs here (through jupyter_client's LocalProvisioner,
kept inside), but there is no ``process`` to read and no local pid to watch."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase, LocalProvisioner
from jupyter_client.provisioning.factory import KernelProvisionerFactory

NAME = "dspex-test-opaque-provisioner"


class OpaqueProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Delegates every provisioner call to a LocalProvisioner it keeps private."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._local = LocalProvisioner(
            kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self.parent
        )

    @property
    def has_process(self) -> bool:
        return self._local.has_process

    async def poll(self) -> int | None:
        return await self._local.poll()

    async def wait(self) -> int | None:
        return await self._local.wait()

    async def send_signal(self, signum: int) -> None:
        await self._local.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        await self._local.kill(restart)

    async def terminate(self, restart: bool = False) -> None:
        await self._local.terminate(restart)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await self._local.pre_launch(**kwargs)
        self.connection_info = self._local.connection_info
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        info = await self._local.launch_kernel(cmd, **kwargs)
        self.connection_info = info
        return info

    async def cleanup(self, restart: bool = False) -> None:
        await self._local.cleanup(restart)

    def local_pid(self) -> int | None:
        """For the test only: the kernel's pid, to kill it from outside."""
        process = self._local.process
        return process.pid if process is not None else None


def register(monkeypatch: Any) -> None:
    """Make the provisioner findable by name without installing a package: jupyter_client
    looks provisioners up in its factory's entry-point cache."""
    entry = EntryPoint(
        name=NAME, value=f"{__name__}:OpaqueProvisioner", group=KernelProvisionerFactory.GROUP_NAME
    )
    factory = KernelProvisionerFactory.instance()
    monkeypatch.setitem(factory.provisioners, NAME, entry)


def write_kernelspec(folder: Path, name: str) -> None:
    """A kernelspec for this Python whose kernels the opaque provisioner starts."""
    spec_dir = folder / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dspex test: opaque provisioner",
        "language": "python",
        # Not the local provisioner: the pool requires CurveZMQ, which ipykernel 7.4 takes.
        "metadata": {
            "kernel_provisioner": {"provisioner_name": NAME, "config": {}},
            "supported_encryption": ["curve"],
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
