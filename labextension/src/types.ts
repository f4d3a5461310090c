/**
 * The wire format between this extension and the `dspex.lab` comm target that
 * `%load_ext dspex_jupyter` registers in a notebook's kernel.
 */

/** The comm target the kernel side registers. */
export const COMM_TARGET = 'dspex.lab';

export interface IKernelInfo {
  id: string;
  pid: number | null;
  state: string;
  session: string | null;
  rss: number | null;
  uptime: number | null;
  calls_served: number | null;
}

export interface IPoolInfo {
  name: string;
  source: string;
  size: number;
  max_memory: number | string | null;
  deaths: number;
  last_error: string | null;
  kernels: IKernelInfo[];
  sessions: string[];
  /** Session id -> what holds it ("run NAME"), for the sessions a run holds. */
  session_names: { [session: string]: string };
}

export interface IRunInfo {
  run_id: string;
  /** The optimizer's name (MIPROv2, GEPA, ...), when the kernel says. */
  optimizer: string | null;
  status: string;
  phase: string | null;
  step: number | null;
  total: number | null;
  trials: number | null;
  best_score: number | null;
  usage: { [key: string]: unknown } | null;
  budget: { [key: string]: unknown } | null;
  notice: string | null;
  pool: string | null;
  checkpoint_dir: string | null;
  error: string | null;
  /** What the optimizer reports of its progress, as [label, text] pairs, shown in order. */
  progress_items: [string, string][];
}

export interface IGpuKernel {
  pid: number | null;
  pool: string | null;
  kernel: string | null;
  used: number | null;
}

export interface IGpuDevice {
  index: number;
  /** Set for a GPU of another machine, as its kernels report it. */
  host: string | null;
  name: string;
  used: number | null;
  total: number | null;
  kernels: IGpuKernel[];
}

export interface ISnapshot {
  time: number;
  pools: IPoolInfo[];
  runs: IRunInfo[];
  gpu: { available: boolean; devices: IGpuDevice[] };
  sessions_active: number;
  /** The notebook kernel's working folder (with the notebook's path: the server's root). */
  cwd: string | null;
}

/** The only actions the frontend can ask for. */
export const ACTIONS = [
  'restart_kernel',
  'release_session',
  'checkpoint_run',
  'cancel_run'
] as const;

export type ActionName = (typeof ACTIONS)[number];

export type ActionTarget =
  | { pool: string; kernel: string }
  | { pool: string; session: string }
  | { run_id: string };

export interface IActionResult {
  id: number;
  action: ActionName;
  target: ActionTarget;
  ok: boolean;
  message: string;
}

/** Where the model stands with the active notebook's kernel. */
export type ConnectionState =
  | 'no-notebook'
  | 'no-kernel'
  | 'connecting'
  | 'not-loaded'
  | 'connected'
  | 'closed'
  | 'restarting'
  | 'dead';

export function isAction(name: string): name is ActionName {
  return (ACTIONS as readonly string[]).includes(name);
}
