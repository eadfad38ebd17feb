import json
import sys

import rankcut
from rankcut.cli import build_parser

p = build_parser()
out = {"public_names": sorted(rankcut.__all__), "help": {}}
sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
out["help"]["rankcut"] = p.format_help()
for name, sp in sub.choices.items():
    out["help"][name] = sp.format_help()
json.dump(out, open(sys.argv[1], "w"), indent=1, sort_keys=True)
print(len(out["help"]), "commands")
