"use strict";
// Command-line flags of the bench's Node servers: --name value pairs.
module.exports = function parseArgs(argv, defaults) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i += 1) {
    if (!argv[i].startsWith("--")) throw new Error(`unexpected argument ${argv[i]}`);
    const key = argv[i].slice(2);
    if (!(key in out)) throw new Error(`unknown flag --${key}`);
    out[key] = argv[i + 1];
    i += 1;
  }
  for (const [key, value] of Object.entries(out)) {
    if (value === undefined) throw new Error(`--${key} is required`);
  }
  return out;
};
