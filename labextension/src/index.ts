/**
 * dspex-jupyter's JupyterLab extension: a sidebar with the active notebook's pools,
 * kernels, sessions and runs, and a status bar item with sessions and GPU memory.
 * Everything comes from the notebook's own kernel through the `dspex.lab` comm.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { DspexModel } from './model';
import { DspexSidebar } from './panel';
import { DspexStatus } from './statusbar';

// A rising best-so-far line over trials: optimization runs on pools of kernels.
const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <rect class="jp-icon3" fill="#616161" x="3" y="19" width="18" height="2" rx="1"/>
  <polyline class="jp-icon3" fill="none" stroke="#616161" stroke-width="2"
    stroke-linejoin="round" stroke-linecap="round" points="4,15 9,10 13,13 20,5"/>
  <circle class="jp-icon3" fill="#616161" cx="9" cy="10" r="2"/>
  <circle class="jp-icon3" fill="#616161" cx="13" cy="13" r="2"/>
  <circle class="jp-icon3" fill="#616161" cx="20" cy="5" r="2"/>
</svg>`;

export const dspexIcon = new LabIcon({ name: 'dspex-jupyter:icon', svgstr: ICON_SVG });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'dspex-jupyter:plugin',
  description: 'Pools, kernels, sessions and runs of the active notebook, from its kernel.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null
  ) => {
    const model = new DspexModel();
    const sidebar = new DspexSidebar(model);
    sidebar.title.icon = dspexIcon;
    app.shell.add(sidebar, 'left', { rank: 600 });

    const follow = () => model.setNotebook(tracker.currentWidget);
    tracker.currentChanged.connect(follow);
    follow();

    if (statusBar) {
      const item = new DspexStatus(model, () => {
        if (labShell) {
          labShell.activateById(sidebar.id);
        } else {
          app.shell.activateById(sidebar.id);
        }
      });
      item.id = 'dspex-status';
      statusBar.registerStatusItem('dspex-jupyter:status', {
        item,
        align: 'left',
        rank: 50,
        isActive: () => true
      });
    }
    console.log('dspex-jupyter extension activated');
  }
};

export default plugin;
