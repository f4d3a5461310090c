/** Small formatting helpers shared by the sidebar and the status bar. */

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function formatBytes(value: unknown): string {
  if (typeof value === 'string') {
    return value;
  }
  if (typeof value !== 'number' || !isFinite(value) || value < 0) {
    return '–';
  }
  let v = value;
  let unit = 0;
  while (v >= 1024 && unit < UNITS.length - 1) {
    v /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${v} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${UNITS[unit]}`;
}

export function formatDuration(seconds: unknown): string {
  if (typeof seconds !== 'number' || !isFinite(seconds) || seconds < 0) {
    return '–';
  }
  const s = Math.floor(seconds);
  if (s < 60) {
    return `${s}s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m}m ${s % 60}s`;
  }
  const h = Math.floor(m / 60);
  if (h < 24) {
    return `${h}h ${m % 60}m`;
  }
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

export function formatNumber(value: unknown, digits = 3): string {
  if (typeof value !== 'number' || !isFinite(value)) {
    return '–';
  }
  if (Number.isInteger(value)) {
    return String(value);
  }
  return value.toFixed(digits);
}

export function formatValue(value: unknown): string {
  if (value === null || value === undefined) {
    return '–';
  }
  if (typeof value === 'number') {
    return formatNumber(value, 4);
  }
  if (typeof value === 'string' || typeof value === 'boolean') {
    return String(value);
  }
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** Health of one kernel from its state: ok, busy, warn or bad. */
export function kernelHealth(state: string): 'ok' | 'busy' | 'warn' | 'bad' {
  const s = (state || '').toLowerCase();
  if (['idle', 'ready', 'ok', 'alive'].includes(s)) {
    return 'ok';
  }
  if (['busy', 'running', 'session', 'in_session', 'calling'].includes(s)) {
    return 'busy';
  }
  if (['starting', 'restarting', 'warming', 'warmup', 'pending', 'replacing'].includes(s)) {
    return 'warn';
  }
  return 'bad';
}

const TERMINAL_RUN_STATES = [
  'completed',
  'complete',
  'done',
  'finished',
  'succeeded',
  'cancelled',
  'canceled',
  'failed',
  'error'
];

export function runIsActive(status: string): boolean {
  return !TERMINAL_RUN_STATES.includes((status || '').toLowerCase());
}

/** A count with thousands separators: 57,366. */
export function formatCount(value: unknown): string {
  if (typeof value !== 'number' || !isFinite(value)) {
    return '–';
  }
  return Math.round(value).toLocaleString('en-US');
}

/**
 * A score as DSPy prints it: 87.5, 47.92, 0.875 (not 87.500); the same rule as
 * `html_render.format_score`, which the run dashboard uses.
 */
export function formatScore(value: unknown): string {
  if (typeof value !== 'number' || !isFinite(value)) {
    return '–';
  }
  let text = value.toFixed(Math.abs(value) >= 1 ? 2 : 3);
  if (text.includes('.')) {
    text = text.replace(/0+$/, '').replace(/\.$/, '');
  }
  return text === '' || text === '-0' ? '0' : text;
}

function num(usage: { [key: string]: unknown }, key: string): number {
  const v = usage[key];
  return typeof v === 'number' && isFinite(v) ? v : 0;
}

/** "57,366 tokens (52,623 prompt, 4,743 completion) · 120 LM calls (8 cached) · $0.0123". */
export function formatUsage(usage: { [key: string]: unknown } | null): string {
  if (!usage || !Object.keys(usage).length) {
    return '';
  }
  const parts = [
    `${formatCount(num(usage, 'total_tokens'))} tokens ` +
      `(${formatCount(num(usage, 'prompt_tokens'))} prompt, ` +
      `${formatCount(num(usage, 'completion_tokens'))} completion)`
  ];
  if ('calls' in usage) {
    const cached = num(usage, 'cached_calls');
    parts.push(
      `${formatCount(num(usage, 'calls'))} LM calls` +
        (cached ? ` (${formatCount(cached)} from the cache)` : '')
    );
  }
  if (num(usage, 'cost') > 0) {
    parts.push(`$${num(usage, 'cost').toFixed(4)}`);
  }
  return parts.join(' · ');
}

/** Usage against each budget the run has: "calls 120 / 500 · tokens 57,366 / 100,000". */
export function formatBudget(
  usage: { [key: string]: unknown } | null,
  budget: { [key: string]: unknown } | null
): string {
  if (!budget) {
    return '';
  }
  const rows: [string, string, string, (v: number) => string][] = [
    ['max_calls', 'calls', 'calls', formatCount],
    ['max_tokens', 'total_tokens', 'tokens', formatCount],
    ['max_cost', 'cost', 'cost', v => `$${v.toFixed(2)}`]
  ];
  return rows
    .filter(([limit]) => typeof budget[limit] === 'number')
    .map(
      ([limit, key, label, show]) =>
        `${label} ${show(usage ? num(usage, key) : 0)} / ${show(budget[limit] as number)}`
    )
    .join(' · ');
}

/**
 * `path` relative to the Jupyter server's root, or null when it is outside it. The root is
 * the page's `serverRoot` when the server says it, or else the kernel's working folder
 * less the notebook's own folder (the kernel starts in the notebook's folder).
 */
export function serverRelative(
  path: string,
  serverRoot: string | null,
  kernelCwd: string | null,
  notebookPath: string | null
): string | null {
  // A root shown home-relative ("~/work") cannot be compared with absolute paths.
  let root = serverRoot && serverRoot.startsWith('/') ? serverRoot.replace(/\/+$/, '') : null;
  if (root === null && kernelCwd && notebookPath !== null) {
    const slash = notebookPath.lastIndexOf('/');
    const dir = slash >= 0 ? notebookPath.slice(0, slash) : '';
    const cwd = kernelCwd.replace(/\/+$/, '');
    if (!dir) {
      root = cwd;
    } else if (cwd.endsWith('/' + dir)) {
      root = cwd.slice(0, cwd.length - dir.length - 1);
    }
  }
  if (root === null) {
    return null;
  }
  if (path === root) {
    return '';
  }
  return path.startsWith(root + '/') ? path.slice(root.length + 1) : null;
}
