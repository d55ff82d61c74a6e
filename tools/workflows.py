"""Check and convert the example workflows without ComfyUI.

- `CORE_NODES`: the ComfyUI core nodes the example workflows use, read off ComfyUI 0.3.64
  (nodes.py, comfy_extras/nodes_canny.py, comfy_extras/nodes_images.py, comfy_extras/nodes_train.py,
  comfy_extras/nodes_post_processing.py) plus the frontend's Note.
- `validate_workflow(ui)`: a list of problems of a UI-format workflow (empty when it is fine):
  unknown node types, links whose types disagree, unlinked required inputs, wrong widget counts.
- `photo_latent_problems(prompt)`: the samplers of an API-format prompt that denoise fully (KSampler at
  denoise 1, KSamplerAdvanced from step 0 with noise added) a latent carrying a VAE-encoded photo.
- `ui_to_api(ui, widget_names)`: the API-format prompt (what POST /prompt takes) of a UI-format
  workflow. `widget_names()` gives the table it needs for our nodes and the core ones.

`python -m tools.workflows` rewrites workflows/api/*.json from workflows/*.json;
`--check` only reports the files that differ.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass

from tools.pack import ROOT, import_pack, node_spec

WORKFLOWS_DIR = os.path.join(ROOT, "workflows")
API_DIR = os.path.join(WORKFLOWS_DIR, "api")

CONTROL = "control_after_generate"  # placeholder in widget-name lists: the seed's control value
UPLOAD = "upload"  # placeholder: LoadImage's upload button, saved by the frontend as "image"
FRONTEND_ONLY_WIDGETS = frozenset({CONTROL, UPLOAD})  # in widgets_values, never sent to the server
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote"})  # frontend-only: never sent to the server
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above `pos`

UI_TOP_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
UI_NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values")

# Core nodes: inputs (name, type, is_widget) in INPUT_TYPES order ("COMBO" for list-valued inputs),
# outputs (types, in RETURN_TYPES order), optional input names, inputs with control_after_generate,
# and the frontend-only widgets the UI saves after the real ones (name, saved value).
CORE_NODES: dict[str, dict] = {
    "CheckpointLoaderSimple": {
        "inputs": [("ckpt_name", "COMBO", True)],
        "outputs": ["MODEL", "CLIP", "VAE"],
    },
    "LoadImage": {
        "inputs": [("image", "COMBO", True)],
        "outputs": ["IMAGE", "MASK"],
        "frontend_widgets": [(UPLOAD, "image")],  # image_upload: True adds an upload button widget
    },
    "VAEDecode": {
        "inputs": [("samples", "LATENT", False), ("vae", "VAE", False)],
        "outputs": ["IMAGE"],
    },
    "VAEEncode": {
        "inputs": [("pixels", "IMAGE", False), ("vae", "VAE", False)],
        "outputs": ["LATENT"],
    },
    "SaveImage": {
        "inputs": [("images", "IMAGE", False), ("filename_prefix", "STRING", True)],
        "outputs": [],
    },
    "PreviewImage": {
        "inputs": [("images", "IMAGE", False)],
        "outputs": [],
    },
    "CLIPTextEncode": {
        "inputs": [("text", "STRING", True), ("clip", "CLIP", False)],
        "outputs": ["CONDITIONING"],
    },
    "KSampler": {
        "inputs": [
            ("model", "MODEL", False), ("seed", "INT", True), ("steps", "INT", True), ("cfg", "FLOAT", True),
            ("sampler_name", "COMBO", True), ("scheduler", "COMBO", True), ("positive", "CONDITIONING", False),
            ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False), ("denoise", "FLOAT", True),
        ],
        "outputs": ["LATENT"],
        "control_after_generate": ["seed"],
    },
    "LoraLoader": {
        "inputs": [
            ("model", "MODEL", False), ("clip", "CLIP", False), ("lora_name", "COMBO", True),
            ("strength_model", "FLOAT", True), ("strength_clip", "FLOAT", True),
        ],
        "outputs": ["MODEL", "CLIP"],
    },
    "ControlNetLoader": {
        "inputs": [("control_net_name", "COMBO", True)],
        "outputs": ["CONTROL_NET"],
    },
    "ControlNetApplyAdvanced": {
        "inputs": [
            ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
            ("control_net", "CONTROL_NET", False), ("image", "IMAGE", False), ("strength", "FLOAT", True),
            ("start_percent", "FLOAT", True), ("end_percent", "FLOAT", True), ("vae", "VAE", False),
        ],
        "outputs": ["CONDITIONING", "CONDITIONING"],
        "optional": ["vae"],
    },
    "Canny": {
        "inputs": [("image", "IMAGE", False), ("low_threshold", "FLOAT", True), ("high_threshold", "FLOAT", True)],
        "outputs": ["IMAGE"],
    },
    "LatentUpscaleBy": {
        "inputs": [("samples", "LATENT", False), ("upscale_method", "COMBO", True), ("scale_by", "FLOAT", True)],
        "outputs": ["LATENT"],
    },
    "GetImageSize": {  # comfy_extras/nodes_images.py; its hidden unique_id is no UI input
        "inputs": [("image", "IMAGE", False)],
        "outputs": ["INT", "INT", "INT"],  # width, height, batch_size
    },
    "ImageScaleToTotalPixels": {  # comfy_extras/nodes_post_processing.py
        "inputs": [("image", "IMAGE", False), ("upscale_method", "COMBO", True), ("megapixels", "FLOAT", True)],
        "outputs": ["IMAGE"],
    },
    "EmptyLatentImage": {
        "inputs": [("width", "INT", True), ("height", "INT", True), ("batch_size", "INT", True)],
        "outputs": ["LATENT"],
    },
    "LossGraphNode": {
        "inputs": [("loss", "LOSS_MAP", False), ("filename_prefix", "STRING", True)],
        "outputs": [],
    },
    "Note": {  # frontend-only text box
        "inputs": [("text", "STRING", True)],
        "outputs": [],
    },
}


# --- node definitions -------------------------------------------------------------------------

load_spec = node_spec  # nodes/spec.py of the pack, imported as a package (never ComfyUI's `nodes`)


@dataclass(frozen=True)
class Input:
    name: str
    type: str
    is_widget: bool
    optional: bool = False
    control_after_generate: bool = False
    options: tuple | None = None
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class NodeDef:
    type: str
    inputs: tuple[Input, ...]
    outputs: tuple[tuple[str | None, str], ...]  # (name or None where not checked, type)
    frontend_widgets: tuple[tuple[str, str], ...] = ()  # (placeholder name, saved value)

    @property
    def sockets(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if not i.is_widget)

    @property
    def widgets(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.is_widget)


def node_defs() -> dict[str, NodeDef]:
    """Every node type the example workflows may use: ours (from nodes/spec.py) and CORE_NODES."""
    spec = load_spec()
    defs = {}
    for node in spec.NODES:
        inputs = tuple(
            Input(i.name, i.type, i.is_widget, i.optional, i.control_after_generate, i.options, i.min, i.max)
            for i in node.inputs
        )
        defs[node.id] = NodeDef(node.id, inputs, tuple((o.name, o.type) for o in node.outputs))
    for type_, entry in CORE_NODES.items():
        optional = set(entry.get("optional", ()))
        control = set(entry.get("control_after_generate", ()))
        inputs = tuple(Input(n, t, w, n in optional, n in control) for n, t, w in entry["inputs"])
        defs[type_] = NodeDef(type_, inputs, tuple((None, t) for t in entry["outputs"]),
                              tuple(entry.get("frontend_widgets", ())))
    return defs


def widget_names(defs: dict[str, NodeDef] | None = None) -> dict[str, list[str]]:
    """Node type -> its widget input names in widgets_values order, with a CONTROL placeholder after
    every input that has control_after_generate and UPLOAD for LoadImage's upload button."""
    defs = node_defs() if defs is None else defs
    table = {}
    for type_, node in defs.items():
        names = []
        for i in node.widgets:
            names.append(i.name)
            if i.control_after_generate:
                names.append(CONTROL)
        names.extend(name for name, _ in node.frontend_widgets)
        table[type_] = names
    return table


# --- UI -> API --------------------------------------------------------------------------------

def ui_to_api(ui: dict, widget_names: dict[str, list[str]]) -> dict:
    """The API-format prompt of a UI-format workflow: {"<id>": {"class_type", "inputs"}} in node-id
    order; widget values by name (control values and other FRONTEND_ONLY_WIDGETS dropped), links as
    [source id as str, slot]. Note nodes are dropped. Only active nodes (mode 0) are supported."""
    sources = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        type_ = node["type"]
        if type_ in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({type_}): mode {node['mode']} (muted/bypassed) is not supported")
        if type_ not in widget_names:
            raise ValueError(f"node {node['id']}: unknown node type {type_!r}")
        names = widget_names[type_]
        values = node.get("widgets_values") or []
        if len(values) != len(names):
            raise ValueError(f"node {node['id']} ({type_}): {len(values)} widget values for widgets {names}")
        linked = {i["name"]: sources[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, value in zip(names, values):
            if name not in FRONTEND_ONLY_WIDGETS:
                inputs[name] = list(linked[name]) if name in linked else value
        for i in node.get("inputs", []):
            if i["name"] in linked and i["name"] not in inputs:
                inputs[i["name"]] = list(linked[i["name"]])
        prompt[str(node["id"])] = {"class_type": type_, "inputs": inputs}
    return prompt


def dumps(obj) -> str:
    """The one JSON text form of the workflow files (stable, so the committed files can be compared)."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def api_path(ui_path: str) -> str:
    return os.path.join(API_DIR, os.path.basename(ui_path))


def ui_workflow_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json")))


# --- validation -------------------------------------------------------------------------------

def _value_problem(inp: Input, value) -> str | None:
    t = inp.type
    if t == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "FLOAT":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t == "BOOLEAN":
        ok = isinstance(value, bool)
    else:  # STRING, COMBO
        ok = isinstance(value, str)
    if not ok:
        return f"{value!r} is not a {t}"
    if t == "COMBO" and inp.options is not None and value not in inp.options:
        return f"{value!r} is not one of {list(inp.options)}"
    if t in ("INT", "FLOAT"):
        if inp.min is not None and value < inp.min or inp.max is not None and value > inp.max:
            return f"{value!r} is outside [{inp.min}, {inp.max}]"
    return None


def validate_workflow(ui: dict, defs: dict[str, NodeDef] | None = None) -> list[str]:
    """Problems of a UI-format workflow, as readable lines; [] when it is fine."""
    defs = node_defs() if defs is None else defs
    errors: list[str] = []
    if not isinstance(ui, dict):
        return ["not a JSON object"]
    missing = [k for k in UI_TOP_KEYS if k not in ui]
    if missing:
        return [f"missing top-level keys {missing}"]
    if ui["version"] != 0.4:
        errors.append(f"version {ui['version']!r}, expected 0.4")
    if not isinstance(ui["groups"], list) or not isinstance(ui["config"], dict):
        errors.append("groups must be a list and config an object")
    if not isinstance(ui["extra"], dict) or "ds" not in ui["extra"]:
        errors.append("extra must hold ds (canvas scale and offset)")

    nodes: dict[int, dict] = {}
    for node in ui["nodes"]:
        lacking = [k for k in UI_NODE_KEYS if k not in node]
        if lacking:
            errors.append(f"node {node.get('id')}: missing keys {lacking}")
            continue
        if node["id"] in nodes:
            errors.append(f"node id {node['id']} used twice")
        nodes[node["id"]] = node
    if errors:
        return errors
    if nodes and ui["last_node_id"] < max(nodes):
        errors.append(f"last_node_id {ui['last_node_id']} < largest node id {max(nodes)}")
    orders = sorted(n["order"] for n in nodes.values())
    if orders != list(range(len(nodes))):
        errors.append(f"node orders {orders} are not 0..{len(nodes) - 1}")

    # nodes: known type, sockets, outputs, widgets
    for nid, node in sorted(nodes.items()):
        where = f"node {nid} ({node['type']})"
        d = defs.get(node["type"])
        if d is None:
            errors.append(f"{where}: unknown node type {node['type']!r}")
            continue
        if node["mode"] != 0:
            errors.append(f"{where}: mode {node['mode']}, expected 0")
        if node["flags"] != {}:
            errors.append(f"{where}: flags {node['flags']}, expected {{}}")
        if node["properties"].get("Node name for S&R") != node["type"]:
            errors.append(f"{where}: properties['Node name for S&R'] must be the node type")
        for key in ("pos", "size"):
            if not (isinstance(node[key], list) and len(node[key]) == 2):
                errors.append(f"{where}: {key} must be [x, y]")

        by_name = {i.name: i for i in d.inputs}
        socket_entries = [e for e in node["inputs"] if "widget" not in e]
        if [e.get("name") for e in socket_entries] != [i.name for i in d.sockets]:
            errors.append(f"{where}: socket inputs {[e.get('name') for e in socket_entries]}, "
                          f"expected {[i.name for i in d.sockets]}")
        for e in node["inputs"]:
            if not {"name", "type", "link"} <= set(e):
                errors.append(f"{where}: input entry {e} lacks name/type/link")
                continue
            inp = by_name.get(e["name"])
            if inp is None:
                errors.append(f"{where}: unknown input {e['name']!r}")
            elif e["type"] != inp.type:
                errors.append(f"{where}: input {e['name']!r} has type {e['type']!r}, expected {inp.type!r}")
            elif "widget" in e and not inp.is_widget:
                errors.append(f"{where}: input {e['name']!r} is not a widget")
        linked = {e.get("name") for e in node["inputs"] if e.get("link") is not None}
        for i in d.sockets:
            if not i.optional and i.name not in linked:
                errors.append(f"{where}: required input {i.name!r} is not linked")

        if len(node["outputs"]) != len(d.outputs):
            errors.append(f"{where}: {len(node['outputs'])} outputs, expected {len(d.outputs)}")
        for slot, (e, (name, type_)) in enumerate(zip(node["outputs"], d.outputs)):
            if e.get("type") != type_:
                errors.append(f"{where}: output {slot} has type {e.get('type')!r}, expected {type_!r}")
            if name is not None and e.get("name") != name:
                errors.append(f"{where}: output {slot} is named {e.get('name')!r}, expected {name!r}")
            if e.get("slot_index") != slot:
                errors.append(f"{where}: output {slot} has slot_index {e.get('slot_index')!r}")
            if not isinstance(e.get("links"), (list, type(None))):
                errors.append(f"{where}: output {slot} links must be a list or null")

        values = node["widgets_values"]
        expected = [x for i in d.widgets
                    for x in ([(i, False), (i, True)] if i.control_after_generate else [(i, False)])]
        expected += [(name, value) for name, value in d.frontend_widgets]
        if not isinstance(values, list) or len(values) != len(expected):
            n = len(values) if isinstance(values, list) else values
            errors.append(f"{where}: {n} widgets_values, expected {len(expected)} "
                          f"({widget_names(defs)[node['type']]})")
            continue
        for value, (inp, is_control) in zip(values, expected):
            if isinstance(inp, str):  # a frontend-only widget: (name, saved value)
                if value != is_control:
                    errors.append(f"{where}: frontend widget {inp!r} is {value!r}, expected {is_control!r}")
            elif is_control:
                if value not in CONTROL_VALUES:
                    errors.append(f"{where}: control value after {inp.name!r} is {value!r}, "
                                  f"expected one of {CONTROL_VALUES}")
            else:
                problem = _value_problem(inp, value)
                if problem:
                    errors.append(f"{where}: widget {inp.name!r}: {problem}")

    # links: both ends exist and agree with each other and with the node definitions
    link_ids = set()
    for link in ui["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            errors.append(f"link {link}: expected [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        lid, src, src_slot, dst, dst_slot, type_ = link
        where = f"link {lid} ({src}:{src_slot} -> {dst}:{dst_slot}, {type_})"
        if lid in link_ids:
            errors.append(f"{where}: link id used twice")
        link_ids.add(lid)
        if src not in nodes or dst not in nodes:
            errors.append(f"{where}: links a missing node")
            continue
        s, t = nodes[src], nodes[dst]
        if not 0 <= src_slot < len(s["outputs"]):
            errors.append(f"{where}: node {src} has no output {src_slot}")
            continue
        if not 0 <= dst_slot < len(t["inputs"]):
            errors.append(f"{where}: node {dst} has no input {dst_slot}")
            continue
        out, inp = s["outputs"][src_slot], t["inputs"][dst_slot]
        types = {"link": type_, "output": out.get("type"), "input": inp.get("type")}
        s_def, t_def = defs.get(s["type"]), defs.get(t["type"])
        if s_def is not None and src_slot < len(s_def.outputs):
            types["source definition"] = s_def.outputs[src_slot][1]
        if t_def is not None:
            inp_def = {i.name: i for i in t_def.inputs}.get(inp.get("name"))
            if inp_def is not None:
                types["target definition"] = inp_def.type
        if len(set(types.values())) != 1:
            errors.append(f"{where}: types disagree: {types}")
        if inp.get("link") != lid:
            errors.append(f"{where}: node {dst} input {inp.get('name')!r} names link {inp.get('link')}")
        if lid not in (out.get("links") or []):
            errors.append(f"{where}: node {src} output {src_slot} does not list it")
        if s["order"] >= t["order"]:
            errors.append(f"{where}: source order {s['order']} is not before target order {t['order']}")
    if link_ids and ui["last_link_id"] < max(link_ids):
        errors.append(f"last_link_id {ui['last_link_id']} < largest link id {max(link_ids)}")
    for nid, node in sorted(nodes.items()):
        for e in node["inputs"]:
            if e.get("link") is not None and e["link"] not in link_ids:
                errors.append(f"node {nid}: input {e.get('name')!r} names missing link {e['link']}")
        for slot, e in enumerate(node["outputs"]):
            for lid in e.get("links") or []:
                if lid not in link_ids:
                    errors.append(f"node {nid}: output {slot} names missing link {lid}")
    return errors


def layout_problems(ui: dict) -> list[str]:
    """Overlapping nodes (title bars included) and links that run right to left."""
    problems = []
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0],
                       n["pos"][1] + n["size"][1]) for n in ui["nodes"]}
    ids = sorted(boxes)
    for k, a in enumerate(ids):
        for b in ids[k + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                problems.append(f"nodes {a} and {b} overlap")
    for lid, src, _, dst, _, _ in ui["links"]:
        if src in boxes and dst in boxes and boxes[src][2] > boxes[dst][0]:
            problems.append(f"link {lid}: node {src} does not end left of node {dst}")
    return problems


# The photo must not reach a full-denoise sampler: SD's schedules end at sigma ~14.6, not infinity, so
# the start x = latent + sigma * noise keeps a trace of the latent, and the edit starts from the photo,
# while DAC samples from pure noise. Empty latents (zeros) are what txt2img starts from.
PHOTO_ENCODERS = ("VAEEncode",)  # every node type that starts with one: VAEEncode, VAEEncodeTiled, ...
FRESH_SAMPLERS = frozenset({"DACCounterfactualSample", "DACSweep"})  # from pure noise; a latent input: only its size


def _full_denoise(node: dict) -> bool:
    """Whether a sampler of an API prompt replaces its whole input latent by noise-then-sampling."""
    inputs = node["inputs"]
    if node["class_type"] == "KSampler":
        denoise = inputs.get("denoise", 1.0)
        return not isinstance(denoise, (int, float)) or denoise >= 1.0  # a linked value: assume the worst
    if node["class_type"] == "KSamplerAdvanced":
        return inputs.get("add_noise", "enable") != "disable" and inputs.get("start_at_step", 0) == 0
    return False


def photo_latent_problems(prompt: dict, defs: dict[str, NodeDef] | None = None) -> list[str]:
    """Samplers of an API-format prompt that fully denoise a latent holding an encoded photo: walks the
    LATENT inputs upstream of each full-denoise KSampler / KSamplerAdvanced (through latent upscales,
    batches, other samplers) and reports every VAEEncode* it reaches. DACCounterfactualSample stops the
    walk (it samples from pure noise). Inputs of node types without a definition all count as latents."""
    defs = node_defs() if defs is None else defs
    problems = []
    for sid, sampler in sorted(prompt.items()):
        if not _full_denoise(sampler):
            continue
        seen, stack = set(), [sampler["inputs"].get("latent_image")]
        while stack:
            link = stack.pop()
            if not isinstance(link, list) or link[0] in seen or link[0] not in prompt:
                continue
            seen.add(link[0])
            node = prompt[link[0]]
            type_ = node["class_type"]
            if type_.startswith(PHOTO_ENCODERS):
                problems.append(f"node {sid} ({sampler['class_type']}) fully denoises the output of node "
                                f"{link[0]} ({type_}): start from an empty latent of the photo's size")
                continue
            if type_ in FRESH_SAMPLERS:
                continue
            d = defs.get(type_)
            latent_inputs = None if d is None else {i.name for i in d.inputs if i.type == "LATENT"}
            stack.extend(v for k, v in node["inputs"].items()
                         if isinstance(v, list) and (latent_inputs is None or k in latent_inputs))
    return problems


# --- regenerate the API copies ------------------------------------------------------------------

def main(argv: list[str]) -> int:
    check = "--check" in argv
    names = widget_names()
    stale = []
    for path in ui_workflow_paths():
        with open(path, encoding="utf-8") as f:
            text = dumps(ui_to_api(json.load(f), names))
        target = api_path(path)
        current = open(target, encoding="utf-8").read() if os.path.exists(target) else None
        if current != text:
            stale.append(target)
            if not check:
                from dac_pack.dac_core.files import atomic_path

                import_pack()
                os.makedirs(API_DIR, exist_ok=True)
                with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
    for target in stale:
        print(("stale: " if check else "wrote: ") + os.path.relpath(target, ROOT))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
