/** The status bar item: active sessions and GPU memory of the active notebook's kernel. */
import { Widget } from '@lumino/widgets';

import { formatBytes } from './format';
import { DspexModel } from './model';

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
    const snap = model.snapshot;
    let text: string;
    if (model.state === 'connected' && snap) {
      const devices = snap.gpu.available ? snap.gpu.devices : [];
      let gpu = 'GPU –';
      if (devices.length) {
        const used = devices.reduce((n, d) => n + (d.used ?? 0), 0);
        const total = devices.reduce((n, d) => n + (d.total ?? 0), 0);
        gpu = `GPU ${formatBytes(used)} / ${formatBytes(total)}`;
      }
      const s = snap.sessions_active;
      text = `DSPex: ${s} session${s === 1 ? '' : 's'} · ${gpu}`;
    } else if (model.state === 'not-loaded') {
      text = 'DSPex: not loaded';
    } else if (model.state === 'no-notebook') {
      text = 'DSPex';
    } else {
      text = 'DSPex: …';
    }
    this.node.dataset.state = model.state;
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
  }

  private _model: DspexModel;
}
