"""NODES.md: every node, input and output with its tooltip, generated from nodes/spec.py.

    python -m tools.nodes_md           # rewrite NODES.md
    python -m tools.nodes_md --check   # exit 1 if NODES.md is stale (the tests check this too)
"""

from __future__ import annotations

import os
import sys

from tools.pack import ROOT, import_pack, node_spec

PATH = os.path.join(ROOT, "NODES.md")


def reference_markdown() -> str:
    spec = node_spec()
    lines = ["# DAC nodes", "", "Generated from `nodes/spec.py` (`python -m tools.nodes_md`). Category: "
             f"**{spec.CATEGORY}**.", ""]
    for node in spec.NODES:
        lines += [f"## {node.display_name} (`{node.id}`)", "", node.description, "",
                  "| input | type | default | effect |", "|---|---|---|---|"]
        for i in node.inputs:
            default = "" if i.default is None else f"`{i.default!r}`"
            if i.options:
                default += f" (one of {', '.join(i.options)})"
            if i.min is not None and i.type == "INT":
                default += f" [{int(i.min)} .. {int(i.max)}]"
            elif i.min is not None and i.type == "FLOAT":
                default += f" [{i.min:g} .. {i.max:g}]"
            kind = i.type + (", list" if i.is_list else "") + (", optional" if i.optional else "")
            lines.append(f"| `{i.name}` | {kind} | {default} | {i.tooltip} |")
        if node.outputs:
            lines += ["", "| output | type | meaning |", "|---|---|---|"]
            lines += [f"| `{o.name}` | {o.type} | {o.tooltip} |" for o in node.outputs]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = reference_markdown()
    with open(PATH, encoding="utf-8") as f:
        stale = f.read() != text
    if "--check" in argv:
        if stale:
            print("stale: NODES.md (run: python -m tools.nodes_md)")
        return int(stale)
    if stale:
        from dac_pack.dac_core.files import atomic_path

        import_pack()
        with atomic_path(PATH) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        print("wrote: NODES.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
