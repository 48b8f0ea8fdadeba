// The SDK's size as an app ships it: bundled and minified by esbuild for
// browsers, then gzipped. Fails over the budget, so growth is a decision.
import { build } from 'esbuild';
import { gzipSync } from 'node:zlib';

const BUDGET_GZIP = 12 * 1024;
const out = await build({
  entryPoints: [new URL('../src/index.js', import.meta.url).pathname],
  bundle: true,
  minify: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2020',
  write: false,
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
console.log(JSON.stringify({ minified_bytes: code.length, gzip_bytes: gz, budget_gzip_bytes: BUDGET_GZIP }));
if (gz > BUDGET_GZIP) {
  console.error(`the SDK is ${gz} bytes gzipped, over its ${BUDGET_GZIP}-byte budget`);
  process.exit(1);
}
