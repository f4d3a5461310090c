#!/usr/bin/env node
/*
 * Build the federated extension into `jupyterlab.outputDir` with @jupyterlab/builder,
 * against the JupyterLab core metadata of @jupyterlab/core-meta (a devDependency).
 * Needs only node: no Python, no `jupyter` on PATH, no network.
 *
 *   node scripts/build-labextension.js [--development]
 */
'use strict';
const { execFileSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.resolve(__dirname, '..');
const coreMeta = path.dirname(require.resolve('@jupyterlab/core-meta/package.json', { paths: [root] }));
const builder = path.join(
  path.dirname(require.resolve('@jupyterlab/builder/package.json', { paths: [root] })),
  'lib',
  'build-labextension.js'
);

// The builder reads the core data from <core-path>/package.json.
const corePath = fs.mkdtempSync(path.join(os.tmpdir(), 'dspex-lab-core-'));
try {
  fs.copyFileSync(path.join(coreMeta, 'core.package.json'), path.join(corePath, 'package.json'));
  execFileSync(
    process.execPath,
    [builder, '--core-path', corePath, ...process.argv.slice(2), root],
    { cwd: root, stdio: 'inherit' }
  );
} finally {
  fs.rmSync(corePath, { recursive: true, force: true });
}
