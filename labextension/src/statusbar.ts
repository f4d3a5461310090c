/** The status item: active sessions and GPU memory of the active notebook's kernel. */
import { Widget } from '@lumino/widgets';

import { formatBytes } from './format';
import { DspexModel } from './model';

/** Sessions and GPU memory in one line: "DSPex: 1 session · GPU 12.0 GiB / 80.0 GiB". */
export function statusText(model: DspexModel): string {
  const snap = model.snapshot;
  if (model.state === 'connected' && snap) {
    const devices = snap.gpu.available ? snap.gpu.devices : [];
    let gpu = 'GPU –';
    if (devices.length) {
      const used = devices.reduce((n, d) => n + (d.used ?? 0), 0);
      const total = devices.reduce((n, d) => n + (d.total ?? 0), 0);
      gpu = `GPU ${formatBytes(used)} / ${formatBytes(total)}`;
    }
    const s = snap.sessions_active;
    return `DSPex: ${s} session${s === 1 ? '' : 's'} · ${gpu}`;
  }
  if (model.state === 'not-loaded') {
    return 'DSPex: not loaded';
  }
  return model.state === 'no-notebook' ? 'DSPex' : 'DSPex: …';
}

/**
 * The status item: in JupyterLab's status bar, or, where there is none (Notebook 7), in the
 * top bar. Clicking it shows the sidebar.
 */
export class DspexStatus extends Widget {
  constructor(model: DspexModel, onClick: () => void) {
    super();
    this._model = model;
    this.addClass('dspex-Status');
    this.addClass('jp-StatusBar-TextItem');
    this.node.title = 'DSPex: click to show pools, sessions and runs';
    this.node.addEventListener('click', onClick);
    model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const model = this._model;
    const text = statusText(model);
    this.node.dataset.state = model.state;
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
  }

  private _model: DspexModel;
}
