/** The extension's icon: the sidebar's tab (JupyterLab) and its header (both). */
import { LabIcon } from '@jupyterlab/ui-components';

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
