/**
 * The connection to the active notebook's kernel: one `dspex.lab` comm, the latest
 * snapshot it sent, and the fixed set of actions the user can ask for.
 */
import { NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  ActionName,
  ActionTarget,
  COMM_TARGET,
  ConnectionState,
  IActionResult,
  ISnapshot,
  isAction
} from './types';

/** How long an action may wait for its result before the panel says so. */
const ACTION_TIMEOUT_MS = 60000;

interface IPending {
  resolve: (result: IActionResult) => void;
  timer: number;
  action: ActionName;
  target: ActionTarget;
}

export class DspexModel {
  /** Emitted whenever the connection state, the snapshot or the last result changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get state(): ConnectionState {
    return this._state;
  }

  get snapshot(): ISnapshot | null {
    return this._snapshot;
  }

  get notebookName(): string | null {
    return this._panel ? this._panel.context.path : null;
  }

  get lastResult(): IActionResult | null {
    return this._lastResult;
  }

  get pendingActions(): number {
    return this._pending.size;
  }

  /** The notebook whose kernel is watched; null when no notebook is open. */
  setNotebook(panel: NotebookPanel | null): void {
    if (panel === this._panel) {
      return;
    }
    if (this._panel) {
      this._panel.sessionContext.kernelChanged.disconnect(this._onKernelChanged, this);
      this._panel.disposed.disconnect(this._onPanelDisposed, this);
    }
    this._panel = panel;
    this._snapshot = null;
    this._lastResult = null;
    if (panel) {
      panel.sessionContext.kernelChanged.connect(this._onKernelChanged, this);
      panel.disposed.connect(this._onPanelDisposed, this);
      this._attachKernel(panel.sessionContext.session?.kernel ?? null);
    } else {
      this._attachKernel(null);
    }
  }

  /** Try again now (the panel's Retry button). */
  reconnect(): void {
    if (this._kernel && !this._kernel.isDisposed) {
      this._connect();
    }
  }

  /** Ask the kernel for one of the fixed actions; resolves with its result. */
  runAction(action: ActionName, target: ActionTarget): Promise<IActionResult> {
    const id = ++this._actionCounter;
    const fail = (message: string): Promise<IActionResult> => {
      const result = { id, action, target, ok: false, message };
      this._setResult(result);
      return Promise.resolve(result);
    };
    if (!isAction(action)) {
      return fail(`unknown action ${String(action)}`);
    }
    const comm = this._comm;
    if (!comm || comm.isDisposed || this._state !== 'connected') {
      return fail('not connected to the notebook kernel');
    }
    return new Promise<IActionResult>(resolve => {
      const timer = window.setTimeout(() => {
        if (this._pending.delete(id)) {
          const result = {
            id,
            action,
            target,
            ok: false,
            message: `no answer from the kernel within ${ACTION_TIMEOUT_MS / 1000} s`
          };
          this._setResult(result);
          resolve(result);
        }
      }, ACTION_TIMEOUT_MS);
      this._pending.set(id, { resolve, timer, action, target });
      this._changed.emit();
      try {
        comm.send({ type: 'action', id, action, target } as any);
      } catch (err) {
        window.clearTimeout(timer);
        this._pending.delete(id);
        const result = { id, action, target, ok: false, message: String(err) };
        this._setResult(result);
        resolve(result);
      }
    });
  }

  dispose(): void {
    this.setNotebook(null);
    Signal.clearData(this);
  }

  private _onPanelDisposed(): void {
    this.setNotebook(null);
  }

  private _onKernelChanged(): void {
    this._snapshot = null;
    this._attachKernel(this._panel?.sessionContext.session?.kernel ?? null);
  }

  private _attachKernel(kernel: Kernel.IKernelConnection | null): void {
    if (kernel === this._kernel && kernel !== null) {
      return;
    }
    if (this._kernel) {
      this._kernel.statusChanged.disconnect(this._onStatus, this);
      this._kernel.iopubMessage.disconnect(this._onIOPub, this);
    }
    this._dropComm(true);
    this._kernel = kernel;
    if (!kernel) {
      this._setState(this._panel ? 'no-kernel' : 'no-notebook');
      return;
    }
    kernel.statusChanged.connect(this._onStatus, this);
    kernel.iopubMessage.connect(this._onIOPub, this);
    this._connect();
  }

  /** Open a fresh comm to `dspex.lab` on the current kernel. */
  private _connect(): void {
    const kernel = this._kernel;
    if (!kernel || kernel.isDisposed) {
      return;
    }
    this._dropComm(true);
    const generation = ++this._generation;
    let heard = false;
    let comm: Kernel.IComm;
    try {
      comm = kernel.createComm(COMM_TARGET);
    } catch (err) {
      console.warn('dspex: could not create a comm', err);
      this._setState('closed');
      return;
    }
    this._comm = comm;
    this._setState('connecting');
    comm.onMsg = (msg: KernelMessage.ICommMsgMsg) => {
      if (generation !== this._generation) {
        return;
      }
      heard = true;
      this._onData(msg.content.data as any);
    };
    comm.onClose = () => {
      if (generation !== this._generation) {
        return;
      }
      this._comm = null;
      this._failPending('the kernel closed the connection');
      // A kernel without the target closes the comm at once, before sending anything.
      this._setState(heard ? 'closed' : 'not-loaded');
    };
    try {
      comm.open({ client: 'jupyterlab', version: 1 });
    } catch (err) {
      console.warn('dspex: could not open the comm', err);
      this._comm = null;
      this._setState('closed');
    }
  }

  /** Forget the current comm; close it in the kernel when it is still usable. */
  private _dropComm(close: boolean): void {
    const comm = this._comm;
    this._comm = null;
    this._generation += 1;
    this._failPending('the connection to the kernel was reset');
    if (comm && close && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // The kernel is gone or restarting: nothing to close.
      }
    }
  }

  private _onData(data: any): void {
    if (!data || typeof data !== 'object') {
      return;
    }
    if (data.type === 'state' && data.state && typeof data.state === 'object') {
      this._snapshot = normalizeSnapshot(data.state);
      this._state = 'connected';
      this._changed.emit();
    } else if (data.type === 'action_result') {
      const pending = this._pending.get(data.id);
      if (!pending) {
        return;
      }
      this._pending.delete(data.id);
      window.clearTimeout(pending.timer);
      const result: IActionResult = {
        id: data.id,
        action: pending.action,
        target: pending.target,
        ok: !!data.ok,
        message: typeof data.message === 'string' ? data.message : ''
      };
      this._setResult(result);
      pending.resolve(result);
    }
  }

  private _onStatus(kernel: Kernel.IKernelConnection, status: KernelMessage.Status): void {
    if (kernel !== this._kernel) {
      return;
    }
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      if (this._state !== 'restarting' && this._state !== 'dead') {
        this._dropComm(false);
        this._snapshot = null;
        this._setState(status === 'dead' ? 'dead' : 'restarting');
      }
    } else if (status === 'idle' && (this._state === 'restarting' || this._state === 'dead')) {
      this._connect();
    }
  }

  /** After each executed cell, retry when the target was missing (`%load_ext` may have run). */
  private _onIOPub(kernel: Kernel.IKernelConnection, msg: KernelMessage.IIOPubMessage): void {
    if (kernel !== this._kernel || msg.header.msg_type !== 'status') {
      return;
    }
    const state = (msg.content as KernelMessage.IStatusMsg['content']).execution_state;
    const parent = (msg.parent_header as any)?.msg_type;
    if (state !== 'idle' || parent !== 'execute_request') {
      return;
    }
    if (this._state === 'not-loaded' || this._state === 'closed') {
      this._connect();
    }
  }

  private _failPending(message: string): void {
    for (const [id, pending] of Array.from(this._pending.entries())) {
      window.clearTimeout(pending.timer);
      this._pending.delete(id);
      const result = { id, action: pending.action, target: pending.target, ok: false, message };
      this._lastResult = result;
      pending.resolve(result);
    }
  }

  private _setResult(result: IActionResult): void {
    this._lastResult = result;
    this._changed.emit();
  }

  private _setState(state: ConnectionState): void {
    if (state !== 'connected') {
      // What is shown is only ever what the current kernel said.
      if (state !== 'connecting') {
        this._snapshot = null;
      }
    }
    this._state = state;
    this._changed.emit();
  }

  private _panel: NotebookPanel | null = null;
  private _kernel: Kernel.IKernelConnection | null = null;
  private _comm: Kernel.IComm | null = null;
  private _generation = 0;
  private _state: ConnectionState = 'no-notebook';
  private _snapshot: ISnapshot | null = null;
  private _lastResult: IActionResult | null = null;
  private _actionCounter = 0;
  private _pending = new Map<number, IPending>();
  private _changed = new Signal<this, void>(this);
}

function asArray(value: unknown): any[] {
  return Array.isArray(value) ? value : [];
}

/** Fill in what a snapshot may lack so the views never meet undefined. */
export function normalizeSnapshot(raw: any): ISnapshot {
  const gpu = raw.gpu && typeof raw.gpu === 'object' ? raw.gpu : {};
  return {
    time: typeof raw.time === 'number' ? raw.time : 0,
    pools: asArray(raw.pools).map(p => ({
      name: String(p.name ?? '?'),
      source: String(p.source ?? ''),
      size: typeof p.size === 'number' ? p.size : asArray(p.kernels).length,
      max_memory: p.max_memory ?? null,
      deaths: typeof p.deaths === 'number' ? p.deaths : 0,
      last_error: p.last_error ? String(p.last_error) : null,
      kernels: asArray(p.kernels).map(k => ({
        id: String(k.id ?? '?'),
        pid: typeof k.pid === 'number' ? k.pid : null,
        state: String(k.state ?? 'unknown'),
        session: k.session ? String(k.session) : null,
        rss: typeof k.rss === 'number' ? k.rss : null,
        uptime: typeof k.uptime === 'number' ? k.uptime : null,
        calls_served: typeof k.calls_served === 'number' ? k.calls_served : null
      })),
      sessions: asArray(p.sessions).map(s => String(s))
    })),
    runs: asArray(raw.runs).map(r => ({
      run_id: String(r.run_id ?? '?'),
      status: String(r.status ?? 'unknown'),
      phase: r.phase ? String(r.phase) : null,
      step: typeof r.step === 'number' ? r.step : null,
      total: typeof r.total === 'number' ? r.total : null,
      trials: typeof r.trials === 'number' ? r.trials : null,
      best_score: typeof r.best_score === 'number' ? r.best_score : null,
      usage: r.usage && typeof r.usage === 'object' ? r.usage : null,
      budget: r.budget && typeof r.budget === 'object' ? r.budget : null,
      notice: r.notice ? String(r.notice) : null,
      pool: r.pool ? String(r.pool) : null,
      checkpoint_dir: r.checkpoint_dir ? String(r.checkpoint_dir) : null,
      error: r.error ? String(r.error) : null
    })),
    gpu: {
      available: !!gpu.available,
      devices: asArray(gpu.devices).map((d, i) => ({
        index: typeof d.index === 'number' ? d.index : i,
        name: String(d.name ?? `GPU ${i}`),
        used: typeof d.used === 'number' ? d.used : null,
        total: typeof d.total === 'number' ? d.total : null,
        kernels: asArray(d.kernels).map(k => ({
          pid: typeof k.pid === 'number' ? k.pid : null,
          pool: k.pool ? String(k.pool) : null,
          kernel: k.kernel ? String(k.kernel) : null,
          used: typeof k.used === 'number' ? k.used : null
        }))
      }))
    },
    sessions_active: typeof raw.sessions_active === 'number' ? raw.sessions_active : 0
  };
}
