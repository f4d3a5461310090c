/**
 * The connection to the active notebook's kernel: one `dspex.lab` comm, the latest
 * snapshot it sent, and the fixed set of actions the user can ask for.
 *
 * The comm is the one the kernel opens when `%load_ext dspex_jupyter` runs (its states come
 * from a kernel thread, so they keep coming while a cell blocks the kernel), or, for a kernel
 * that loaded the extension before this page was there, one this page opens. That one is
 * opened over a kernel subshell where the kernel has them (JEP 91, ipykernel 7), so it is
 * answered at once even during Run All.
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
/** How long to wait for a comm's kernel subshell before opening it on the main shell. */
const SUBSHELL_WAIT_MS = 5000;
/**
 * The kernel sends a state at least every 2 s, from a thread. A comm silent for longer than
 * this is dead on the kernel's side (another client of the kernel that does not know
 * `dspex.lab`, a console say, refused the comm the kernel opened, which closes it for all):
 * open one of our own.
 */
const SILENT_AFTER_MS = 8000;

/** A comm the kernel opened, and the last state it sent (shown at once on switching). */
interface IKernelComm {
  comm: Kernel.IComm;
  last: any;
}

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

  /**
   * Accept the comms `kernel` opens to `dspex.lab` (called for every open notebook's kernel,
   * so a notebook that is not the active one keeps its comm for when it is).
   */
  watchKernel(kernel: Kernel.IKernelConnection | null | undefined): void {
    if (!kernel || kernel.isDisposed || this._registered.has(kernel)) {
      return;
    }
    this._registered.add(kernel);
    kernel.registerCommTarget(COMM_TARGET, comm => this._onKernelComm(kernel, comm));
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
    window.clearInterval(this._watchdog);
    this.setNotebook(null);
    Signal.clearData(this);
  }

  /** Reconnect when a connected comm has gone silent (see SILENT_AFTER_MS). */
  private _checkSilence(): void {
    const kernel = this._kernel;
    if (!kernel || this._state !== 'connected' || !this._comm) {
      return;
    }
    if (Date.now() - this._lastState < SILENT_AFTER_MS) {
      return;
    }
    if (this._kernelComms.get(kernel)?.comm === this._comm) {
      this._kernelComms.delete(kernel); // the kernel no longer sends on it
    }
    console.warn('dspex: no state from the kernel for a while; reconnecting');
    this._connect();
  }

  private _onPanelDisposed(): void {
    this.setNotebook(null);
  }

  private _onKernelChanged(): void {
    this._snapshot = null;
    this._attachKernel(this._panel?.sessionContext.session?.kernel ?? null);
  }

  /** The kernel opened a comm to us (`%load_ext` ran): the states come on it from now on. */
  private _onKernelComm(kernel: Kernel.IKernelConnection, comm: Kernel.IComm): void {
    const entry: IKernelComm = { comm, last: null };
    const previous = this._kernelComms.get(kernel);
    this._kernelComms.set(kernel, entry);
    if (previous && previous.comm !== comm && !previous.comm.isDisposed) {
      previous.comm.dispose(); // superseded: the kernel closed it or forgot it
    }
    comm.onMsg = (m: KernelMessage.ICommMsgMsg) => {
      const data = m.content.data as any;
      if (data && data.type === 'state') {
        entry.last = data;
      }
      if (this._comm === comm) {
        this._onData(data);
      }
    };
    comm.onClose = () => {
      if (this._kernelComms.get(kernel) === entry) {
        this._kernelComms.delete(kernel);
      }
      if (this._comm === comm) {
        this._comm = null;
        this._failPending('the kernel closed the connection');
        this._setState('closed');
      }
    };
    if (kernel === this._kernel) {
      this._adopt(entry);
    }
  }

  /** Use a comm the kernel opened (closing one this page opened, if any). */
  private _adopt(entry: IKernelComm): void {
    if (this._comm === entry.comm) {
      return;
    }
    this._dropComm(true);
    this._comm = entry.comm;
    if (entry.last) {
      this._onData(entry.last);
    } else {
      this._setState('connecting');
    }
  }

  private _attachKernel(kernel: Kernel.IKernelConnection | null): void {
    if (kernel === this._kernel && kernel !== null) {
      return;
    }
    this.watchKernel(kernel);
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

  /** Use the kernel's own comm, or open a fresh one to `dspex.lab` on the current kernel. */
  private _connect(): void {
    const kernel = this._kernel;
    if (!kernel || kernel.isDisposed) {
      return;
    }
    const offered = this._kernelComms.get(kernel);
    if (offered && !offered.comm.isDisposed) {
      this._adopt(offered);
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
    void this._open(kernel, comm, generation);
  }

  /** Open `comm`, over its kernel subshell when the kernel has subshells. */
  private async _open(
    kernel: Kernel.IKernelConnection,
    comm: Kernel.IComm,
    generation: number
  ): Promise<void> {
    try {
      await kernel.info;
      const started: Promise<void> | undefined = (comm as any).subshellStarted;
      if (kernel.supportsSubshells && started) {
        let timer = 0;
        await Promise.race([
          started.catch(() => undefined),
          new Promise<void>(resolve => {
            timer = window.setTimeout(resolve, SUBSHELL_WAIT_MS);
          })
        ]);
        window.clearTimeout(timer);
      }
    } catch {
      // No kernel info (a kernel restarting): open on the main shell as before.
    }
    if (generation !== this._generation || comm.isDisposed) {
      return;
    }
    try {
      comm.open({ client: 'jupyterlab', version: 1 });
    } catch (err) {
      console.warn('dspex: could not open the comm', err);
      this._comm = null;
      this._setState('closed');
    }
  }

  /** Forget the current comm; close it in the kernel when it is still usable (a comm the
   * kernel opened stays open: it serves this page again when its notebook is active). */
  private _dropComm(close: boolean): void {
    const comm = this._comm;
    this._comm = null;
    this._generation += 1;
    this._failPending('the connection to the kernel was reset');
    const kernel = this._kernel;
    const kernelOwned = !!kernel && this._kernelComms.get(kernel)?.comm === comm;
    if (comm && close && !comm.isDisposed && !kernelOwned) {
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
      this._lastState = Date.now();
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
      this._kernelComms.delete(kernel); // a restarted kernel forgot every comm
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

  private _lastState = 0;
  private _watchdog = window.setInterval(() => this._checkSilence(), SILENT_AFTER_MS / 4);
  private _registered = new WeakSet<Kernel.IKernelConnection>();
  private _kernelComms = new WeakMap<Kernel.IKernelConnection, IKernelComm>();
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

function stringMap(value: unknown): { [key: string]: string } {
  const out: { [key: string]: string } = {};
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      out[k] = String(v);
    }
  }
  return out;
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
      sessions: asArray(p.sessions).map(s => String(s)),
      session_names: stringMap(p.session_names)
    })),
    runs: asArray(raw.runs).map(r => ({
      run_id: String(r.run_id ?? '?'),
      optimizer: r.optimizer ? String(r.optimizer) : null,
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
      error: r.error ? String(r.error) : null,
      // [[label, text], ...]: what an optimizer reports of its progress, shown as it is.
      progress_items: asArray(r.progress_items)
        .filter(item => Array.isArray(item) && item.length >= 2)
        .map(item => [String(item[0]), String(item[1])] as [string, string])
    })),
    gpu: {
      available: !!gpu.available,
      devices: asArray(gpu.devices).map((d, i) => ({
        index: typeof d.index === 'number' ? d.index : i,
        host: d.host ? String(d.host) : null,
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
    sessions_active: typeof raw.sessions_active === 'number' ? raw.sessions_active : 0,
    cwd: typeof raw.cwd === 'string' ? raw.cwd : null
  };
}
