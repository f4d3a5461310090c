/**
 * dspex-jupyter's JupyterLab and Notebook 7 extension: a sidebar with the active notebook's
 * pools, kernels, sessions and runs, and a status item with sessions and GPU memory (in the
 * status bar, or in the top bar where there is no status bar: Notebook 7).
 * Everything comes from the notebook's own kernel through the `dspex.lab` comm.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

import { dspexIcon } from './icon';
import { DspexModel } from './model';
import { DspexSidebar, IOpener } from './panel';
import { DspexStatus } from './statusbar';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'dspex-jupyter:plugin',
  description: 'Pools, kernels, sessions and runs of the active notebook, from its kernel.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ILabShell, JupyterFrontEnd.IPaths],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    labShell: ILabShell | null,
    paths: JupyterFrontEnd.IPaths | null
  ) => {
    const model = new DspexModel();
    const base = app.serviceManager.serverSettings.baseUrl.replace(/\/+$/, '');
    const opener: IOpener = {
      serverRoot: paths?.directories.serverRoot || null,
      openFolder: path => {
        if (labShell) {
          void app.commands.execute('filebrowser:go-to-path', { path: `/${path}` });
        } else {
          // Notebook 7 browses folders in its tree page.
          const tree = path.split('/').map(encodeURIComponent).join('/');
          window.open(`${base}/tree/${tree}`, '_blank');
        }
      },
      openFile: path => {
        void app.commands.execute('docmanager:open', { path, factory: 'Editor' });
      }
    };
    const sidebar = new DspexSidebar(model, opener);
    sidebar.title.icon = dspexIcon;
    app.shell.add(sidebar, 'left', { rank: 600 });

    // Every open notebook's kernel may open its `dspex.lab` comm (at `%load_ext`), the
    // active one or not: accept them all, so switching notebooks shows its state at once.
    tracker.widgetAdded.connect((_, panel) => {
      const watch = () => model.watchKernel(panel.sessionContext.session?.kernel);
      panel.sessionContext.kernelChanged.connect(watch);
      watch();
    });
    tracker.forEach(panel => model.watchKernel(panel.sessionContext.session?.kernel));
    const follow = () => model.setNotebook(tracker.currentWidget);
    tracker.currentChanged.connect(follow);
    follow();

    const item = new DspexStatus(model, () => app.shell.activateById(sidebar.id));
    item.id = 'dspex-status';
    if (statusBar) {
      statusBar.registerStatusItem('dspex-jupyter:status', {
        item,
        align: 'left',
        rank: 50,
        isActive: () => true
      });
    } else {
      item.addClass('dspex-Status-top');
      app.shell.add(item, 'top', { rank: 900 });
    }
    console.log('dspex-jupyter extension activated');
  }
};

export default plugin;
