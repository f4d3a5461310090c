/** The sidebar: pools, kernels, sessions, runs and GPUs of the active notebook's kernel. */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  formatBudget,
  formatBytes,
  formatDuration,
  formatScore,
  formatUsage,
  kernelHealth,
  runIsActive,
  serverRelative
} from './format';
import { dspexIcon } from './icon';
import { DspexModel } from './model';
import { statusText } from './statusbar';
import { ActionName, ActionTarget, IGpuDevice, IPoolInfo, IRunInfo, ISnapshot } from './types';
import { h, IVNode, patchChildren, VChild } from './vdom';

const STATE_LABELS: { [state: string]: string } = {
  'no-notebook': 'no notebook',
  'no-kernel': 'no kernel',
  connecting: 'connecting…',
  'not-loaded': 'not loaded',
  connected: 'connected',
  closed: 'disconnected',
  restarting: 'kernel restarting',
  dead: 'kernel dead'
};

/** Actions that stop or lose work ask first. */
const CONFIRM: { [action: string]: (target: any) => [string, string, string] } = {
  restart_kernel: t => [
    'Restart pool kernel',
    `Restart kernel ${t.kernel} of pool ${t.pool}? Its state is lost; a session on it ends.`,
    'Restart kernel'
  ],
  release_session: t => [
    'Release session',
    `Release session ${t.session} of pool ${t.pool}? Its kernel returns to the pool.`,
    'Release session'
  ],
  cancel_run: t => [
    'Cancel run',
    `Cancel run ${t.run_id}? Finished trials stay in its checkpoint.`,
    'Cancel run'
  ]
};

const ACTION_LABELS: { [action: string]: string } = {
  restart_kernel: 'Restart kernel',
  release_session: 'Release session',
  checkpoint_run: 'Checkpoint',
  cancel_run: 'Cancel run'
};

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** How the sidebar opens what a run wrote, in JupyterLab or Notebook 7. */
export interface IOpener {
  /** The Jupyter server's root folder (absolute), when the page says it. */
  serverRoot: string | null;
  /** Show a folder (relative to the server root) in the file browser. */
  openFolder(path: string): void;
  /** Open a file (relative to the server root) in the editor. */
  openFile(path: string): void;
}

export class DspexSidebar extends Widget {
  constructor(model: DspexModel, opener: IOpener | null = null) {
    super();
    this._model = model;
    this._opener = opener;
    this.id = 'dspex-sidebar';
    this.addClass('dspex-Sidebar');
    this.title.caption = 'DSPex: pools, sessions and runs';
    this.node.addEventListener('click', this._onClick);
    model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.node.removeEventListener('click', this._onClick);
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _onClick = (event: MouseEvent): void => {
    const button = (event.target as HTMLElement).closest('button');
    if (!button || !this.node.contains(button) || button.disabled) {
      return;
    }
    const data = button.dataset;
    if (data.command === 'retry') {
      this._model.reconnect();
      return;
    }
    if (data.command === 'open-folder' && this._opener && data.path !== undefined) {
      this._opener.openFolder(data.path);
      return;
    }
    if (data.command === 'open-file' && this._opener && data.path !== undefined) {
      this._opener.openFile(data.path);
      return;
    }
    const action = data.action as ActionName | undefined;
    if (!action) {
      return;
    }
    let target: ActionTarget;
    if (action === 'restart_kernel') {
      target = { pool: data.pool as string, kernel: data.kernel as string };
    } else if (action === 'release_session') {
      target = { pool: data.pool as string, session: data.session as string };
    } else if (action === 'checkpoint_run' || action === 'cancel_run') {
      target = { run_id: data.run as string };
    } else {
      return;
    }
    void this._ask(action, target);
  };

  private async _ask(action: ActionName, target: ActionTarget): Promise<void> {
    const confirm = CONFIRM[action];
    if (confirm) {
      const [title, body, accept] = confirm(target);
      const answer = await showDialog({
        title,
        body,
        buttons: [
          Dialog.cancelButton({ label: 'Back' }),
          Dialog.warnButton({ label: accept })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
    }
    const key = `${action}:${JSON.stringify(target)}`;
    this._busy.add(key);
    this._render();
    try {
      await this._model.runAction(action, target);
    } finally {
      this._busy.delete(key);
      this._render();
    }
  }

  private _button(
    label: string,
    action: ActionName,
    target: ActionTarget,
    attrs: { [name: string]: string },
    disabledBecause: string | null
  ): IVNode {
    const busy = this._busy.has(`${action}:${JSON.stringify(target)}`);
    // A disabled control says why (in its tooltip, and to screen readers).
    let why = disabledBecause;
    if (!why && busy) {
      why = 'waiting for the kernel to answer';
    }
    if (!why && this._model.state !== 'connected') {
      why = 'not connected to the notebook kernel';
    }
    return h(
      'button',
      {
        class: `jp-Button dspex-Button dspex-Button-${action}`,
        type: 'button',
        'data-action': action,
        ...attrs,
        disabled: !!why,
        title: why ? `${ACTION_LABELS[action]}: ${why}` : ACTION_LABELS[action],
        'aria-label': label
      },
      busy ? `${label}…` : label
    );
  }

  private _render(): void {
    if (this.isDisposed) {
      return;
    }
    const model = this._model;
    const state = model.state;
    const snap = model.snapshot;
    const children: VChild[] = [
      h(
        'div',
        { class: 'dspex-Header' },
        h(
          'span',
          { class: 'dspex-Title' },
          h('span', { class: 'dspex-TitleIcon', 'data-static': '', 'aria-hidden': 'true' }),
          'DSPex'
        ),
        h(
          'span',
          { class: `dspex-Conn dspex-Conn-${state}`, 'data-state': state },
          STATE_LABELS[state] ?? state
        )
      ),
      // The status line lives here too: Notebook 7 has no status bar.
      h('div', { class: 'dspex-HeaderStatus' }, statusText(model)),
      h(
        'div',
        { class: 'dspex-Notebook', title: model.notebookName ?? '' },
        model.notebookName ?? 'Open a notebook to see its pools and runs.'
      )
    ];
    const message = this._message(state);
    if (message) {
      children.push(message);
    }
    const result = model.lastResult;
    if (result) {
      children.push(
        h(
          'div',
          {
            class: `dspex-Result ${result.ok ? 'dspex-ok' : 'dspex-bad'}`,
            'data-action': result.action,
            'data-ok': result.ok ? 'true' : 'false'
          },
          h('strong', null, `${ACTION_LABELS[result.action] ?? result.action}: `),
          result.ok ? 'done' : 'failed',
          result.message ? ` — ${result.message}` : ''
        )
      );
    }
    if (snap) {
      children.push(this._summary(snap), this._pools(snap), this._runs(snap), this._gpus(snap));
    }
    patchChildren(this.node, children);
    const icon = this.node.querySelector('.dspex-TitleIcon');
    if (icon && !icon.firstChild) {
      dspexIcon.element({ container: icon as HTMLElement, height: '16px', width: '16px' });
    }
  }

  private _message(state: string): IVNode | null {
    switch (state) {
      case 'not-loaded':
        return h(
          'div',
          { class: 'dspex-Message dspex-NotLoaded' },
          'Run ',
          h('code', null, '%load_ext dspex_jupyter'),
          ' in this notebook',
          h('button', { class: 'jp-Button dspex-Retry', 'data-command': 'retry' }, 'Retry')
        );
      case 'no-notebook':
        return null;
      case 'no-kernel':
        return h('div', { class: 'dspex-Message' }, 'This notebook has no kernel.');
      case 'connecting':
        return h('div', { class: 'dspex-Message' }, 'Connecting to the kernel…');
      case 'closed':
        return h(
          'div',
          { class: 'dspex-Message' },
          'The kernel closed the connection.',
          h('button', { class: 'jp-Button dspex-Retry', 'data-command': 'retry' }, 'Retry')
        );
      case 'restarting':
        return h('div', { class: 'dspex-Message' }, 'The kernel is restarting…');
      case 'dead':
        return h('div', { class: 'dspex-Message dspex-bad' }, 'The kernel is dead.');
      default:
        return null;
    }
  }

  private _summary(snap: ISnapshot): IVNode {
    const kernels = snap.pools.reduce((n, p) => n + p.kernels.length, 0);
    const active = snap.runs.filter(r => runIsActive(r.status)).length;
    return h(
      'div',
      { class: 'dspex-Summary' },
      h('span', { class: 'dspex-Summary-pools' }, plural(snap.pools.length, 'pool')),
      ' · ',
      h('span', null, plural(kernels, 'kernel')),
      ' · ',
      h('span', { class: 'dspex-Summary-sessions' }, plural(snap.sessions_active, 'session')),
      ' · ',
      h('span', { class: 'dspex-Summary-runs' }, `${plural(snap.runs.length, 'run')} (${active} active)`)
    );
  }

  private _pools(snap: ISnapshot): IVNode {
    return h(
      'section',
      { class: 'dspex-Section dspex-Pools' },
      h('h3', null, `Pools (${snap.pools.length})`),
      snap.pools.length
        ? snap.pools.map(p => this._pool(p))
        : h('div', { class: 'dspex-Empty' }, 'No pools yet: start one with %dspex start NAME.')
    );
  }

  private _pool(pool: IPoolInfo): IVNode {
    const health = pool.kernels.map(k => kernelHealth(k.state));
    const degraded = health.includes('bad') || !!pool.last_error;
    const starting = !degraded && (health.includes('warn') || pool.kernels.length < pool.size);
    const badge = degraded ? 'degraded' : starting ? 'starting' : 'healthy';
    const kernelRows = pool.kernels.map(k => {
      const health = kernelHealth(k.state);
      return h(
        'div',
        { key: k.id, class: `dspex-Kernel dspex-health-${health}`, 'data-kernel': k.id },
        h(
          'div',
          { class: 'dspex-KernelHead' },
          h('span', { class: `dspex-Dot dspex-health-${health}`, title: health }),
          h('span', { class: 'dspex-KernelId dspex-mono' }, k.id),
          h('span', { class: 'dspex-KernelState' }, k.state),
          h('span', { class: 'dspex-Spacer' }),
          this._button(
            'Restart',
            'restart_kernel',
            { pool: pool.name, kernel: k.id },
            { 'data-pool': pool.name, 'data-kernel': k.id },
            k.state === 'starting' ? 'the kernel is starting' : null
          )
        ),
        h(
          'div',
          { class: 'dspex-KernelMeta' },
          [
            `pid ${k.pid ?? '–'}`,
            k.session ? `in ${sessionName(pool, k.session)}` : 'no session',
            `RSS ${formatBytes(k.rss)}`,
            `up ${formatDuration(k.uptime)}`,
            `${k.calls_served ?? 0} calls`
          ].join(' · ')
        )
      );
    });
    return h(
      'div',
      { key: pool.name, class: 'dspex-Pool', 'data-pool': pool.name },
      h(
        'div',
        { class: 'dspex-PoolHead' },
        h('span', { class: 'dspex-PoolName' }, pool.name),
        h('span', { class: `dspex-Badge dspex-Badge-${badge}` }, badge)
      ),
      h(
        'div',
        { class: 'dspex-PoolMeta' },
        `${pool.source || 'default'} · ${pool.kernels.length}/${pool.size} kernels` +
          (pool.max_memory !== null ? ` · max ${formatBytes(pool.max_memory)}` : '') +
          ` · deaths ${pool.deaths}`
      ),
      pool.last_error
        ? h('div', { class: 'dspex-Error', title: pool.last_error }, pool.last_error)
        : null,
      h('div', { class: 'dspex-Kernels' }, kernelRows),
      h(
        'div',
        { class: 'dspex-Sessions' },
        h('span', { class: 'dspex-Label' }, `Sessions (${pool.sessions.length}): `),
        pool.sessions.length
          ? pool.sessions.map(s =>
              h(
                'span',
                { key: s, class: 'dspex-Session', 'data-session': s, title: `session ${s}` },
                h('span', { class: 'dspex-SessionName' }, sessionName(pool, s)),
                ' ',
                this._button(
                  'Release',
                  'release_session',
                  { pool: pool.name, session: s },
                  { 'data-pool': pool.name, 'data-session': s },
                  null
                )
              )
            )
          : h('span', { class: 'dspex-Empty' }, 'none')
      )
    );
  }

  private _runs(snap: ISnapshot): IVNode {
    return h(
      'section',
      { class: 'dspex-Section dspex-Runs' },
      h('h3', null, `Runs (${snap.runs.length})`),
      snap.runs.length
        ? snap.runs.map(r => this._run(r))
        : h('div', { class: 'dspex-Empty' }, 'No runs yet: start one with %dspex optimize.')
    );
  }

  private _run(run: IRunInfo): IVNode {
    const active = runIsActive(run.status);
    const pct =
      run.total && run.step !== null ? Math.max(0, Math.min(100, (100 * run.step) / run.total)) : 0;
    const usage = formatUsage(run.usage);
    const budget = formatBudget(run.usage, run.budget);
    const finished = active ? null : `the run is ${run.status}`;
    return h(
      'div',
      {
        key: run.run_id,
        class: 'dspex-Run',
        'data-run': run.run_id,
        'data-status': run.status
      },
      h(
        'div',
        { class: 'dspex-RunHead' },
        h('span', { class: 'dspex-RunName' }, run.run_id),
        run.optimizer ? h('span', { class: 'dspex-RunOptimizer' }, run.optimizer) : null,
        h('span', { class: `dspex-Badge dspex-Status-${run.status.toLowerCase()}` }, run.status)
      ),
      h(
        'div',
        {
          class: 'dspex-Progress',
          role: 'progressbar',
          'aria-valuemin': '0',
          'aria-valuemax': '100',
          'aria-valuenow': pct.toFixed(0),
          title: `${run.step ?? '–'} / ${run.total ?? '–'}`
        },
        h('div', { class: 'dspex-ProgressBar', style: `width: ${pct.toFixed(1)}%` })
      ),
      h(
        'div',
        { class: 'dspex-RunMeta' },
        h('span', { class: 'dspex-RunPhase' }, run.phase ?? '–'),
        ' · ',
        h('span', { class: 'dspex-RunStep' }, `step ${run.step ?? '–'} / ${run.total ?? '–'}`),
        ' · ',
        h('span', { class: 'dspex-RunTrials' }, `trials ${run.trials ?? 0}`),
        ' · ',
        h('span', { class: 'dspex-RunBest' }, `best ${formatScore(run.best_score)}`),
        run.pool ? ` · pool ${run.pool}` : ''
      ),
      run.progress_items.length
        ? h(
            'dl',
            { class: 'dspex-RunItems' },
            run.progress_items.map(([label, text], i) =>
              h(
                'div',
                { key: `${i}:${label}`, class: 'dspex-RunItem' },
                h('dt', null, label),
                h('dd', null, text)
              )
            )
          )
        : null,
      usage ? h('div', { class: 'dspex-RunUsage' }, usage) : null,
      budget ? h('div', { class: 'dspex-RunBudget' }, `budget: ${budget}`) : null,
      run.notice ? h('div', { class: 'dspex-RunNotice' }, run.notice) : null,
      run.checkpoint_dir ? this._checkpoint(run.checkpoint_dir) : null,
      run.error ? h('div', { class: 'dspex-Error', title: run.error }, run.error) : null,
      h(
        'div',
        { class: 'dspex-RunActions' },
        this._button(
          'Checkpoint',
          'checkpoint_run',
          { run_id: run.run_id },
          { 'data-run': run.run_id },
          finished
        ),
        this._button(
          'Cancel',
          'cancel_run',
          { run_id: run.run_id },
          { 'data-run': run.run_id },
          finished
        )
      )
    );
  }

  /** The checkpoint folder and its run.log, each opened in Jupyter with one click. */
  private _checkpoint(dir: string): IVNode {
    const model = this._model;
    const snap = model.snapshot;
    const rel = serverRelative(
      dir,
      this._opener?.serverRoot ?? null,
      snap?.cwd ?? null,
      model.notebookName
    );
    const name = dir.replace(/\/+$/, '').split('/').pop() || dir;
    if (rel === null || !this._opener) {
      return h(
        'div',
        {
          class: 'dspex-RunCheckpoint',
          title: `${dir} (outside the Jupyter server's root: open it from a terminal)`
        },
        'checkpoint: ',
        h('span', { class: 'dspex-mono' }, dir)
      );
    }
    const log = rel ? `${rel}/run.log` : 'run.log';
    return h(
      'div',
      { class: 'dspex-RunCheckpoint' },
      'checkpoint ',
      h(
        'button',
        {
          class: 'dspex-Link dspex-OpenFolder',
          type: 'button',
          'data-command': 'open-folder',
          'data-path': rel,
          title: `Show ${rel || 'the root folder'} in the file browser`
        },
        `${name}/`
      ),
      ' · ',
      h(
        'button',
        {
          class: 'dspex-Link dspex-OpenLog',
          type: 'button',
          'data-command': 'open-file',
          'data-path': log,
          title: `Open ${log} (what DSPy printed during the run)`
        },
        'run.log'
      )
    );
  }

  private _gpus(snap: ISnapshot): IVNode {
    const gpu = snap.gpu;
    return h(
      'section',
      { class: 'dspex-Section dspex-Gpus' },
      h('h3', null, 'GPU memory'),
      gpu.available && gpu.devices.length
        ? gpu.devices.map(d => this._gpu(d))
        : h('div', { class: 'dspex-Empty' }, 'No GPU visible to this kernel.')
    );
  }

  private _gpu(device: IGpuDevice): IVNode {
    const pct =
      device.total && device.used !== null ? Math.min(100, (100 * device.used) / device.total) : 0;
    return h(
      'div',
      {
        key: `${device.host ?? ''}:${device.index}`,
        class: 'dspex-Gpu',
        'data-gpu': String(device.index)
      },
      h(
        'div',
        { class: 'dspex-GpuHead' },
        `${device.index}: ${device.name} — ${formatBytes(device.used)} / ${formatBytes(device.total)}`
      ),
      h(
        'div',
        { class: 'dspex-Progress' },
        h('div', { class: 'dspex-ProgressBar dspex-GpuBar', style: `width: ${pct.toFixed(1)}%` })
      ),
      device.kernels.length
        ? h(
            'ul',
            { class: 'dspex-GpuKernels' },
            device.kernels.map(k =>
              h(
                'li',
                null,
                `${k.pool ?? '?'}/${k.kernel ?? '?'} (pid ${k.pid ?? '?'}): ${formatBytes(k.used)}`
              )
            )
          )
        : null
    );
  }

  private _model: DspexModel;
  private _opener: IOpener | null;
  private _busy = new Set<string>();
}

/** A session by what holds it ("run NAME"), else by its id. */
function sessionName(pool: IPoolInfo, session: string): string {
  return pool.session_names[session] ?? `session ${session}`;
}
