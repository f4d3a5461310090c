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
