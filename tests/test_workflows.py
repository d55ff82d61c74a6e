"""The example workflows and the node schemas they rely on, checked without ComfyUI."""

from __future__ import annotations

import copy
import json
import os

import pytest

from tools import workflows as wt

UI_PATHS = wt.ui_workflow_paths()
EXPECTED_WORKFLOWS = {"dac_basic_edit.json", "dac_controlnet_edit.json", "dac_edit_then_upscale.json",
                      "dac_save_and_share.json", "dac_sdxl_edit.json"}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ids(paths):
    return [os.path.basename(p) for p in paths]


def _settings(spec, name):
    """Where a workflow departs from the node defaults on purpose: (node type, input) -> value.
    SDXL: the UNet rank is SDXL's default (the node's default is SD 1.x / 2.x's, 512), and bf16
    with gradient checkpointing, so that the abductions fit a 24 GB GPU."""
    if name == "dac_sdxl_edit.json":
        return {("DACAbductUNetLoRA", "rank"): spec.P.UNET_RANK_DEFAULTS["sdxl"],
                ("DACAbductUNetLoRA", "training_dtype"): "bf16",
                ("DACAbductUNetLoRA", "gradient_checkpointing"): True,
                ("DACAbductTextLoRA", "training_dtype"): "bf16",
                ("DACAbductTextLoRA", "gradient_checkpointing"): True}
    return {}


@pytest.fixture(scope="module")
def spec():
    return wt.load_spec()


# --- the workflows ------------------------------------------------------------------------------

def test_the_example_workflows_are_there():
    assert EXPECTED_WORKFLOWS <= set(_ids(UI_PATHS))
    api = {os.path.basename(p) for p in os.listdir(wt.API_DIR) if p.endswith(".json")}
    assert api == set(_ids(UI_PATHS)), "every UI workflow has an API copy and nothing else is in workflows/api"


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_workflow_is_a_valid_ui_format_graph(path):
    ui = _load(path)
    for key in wt.UI_TOP_KEYS:
        assert key in ui, key
    assert ui["version"] == 0.4
    assert ui["groups"] == [] and ui["config"] == {}
    assert ui["extra"] == {"ds": {"scale": 1, "offset": [0, 0]}}
    assert wt.validate_workflow(ui) == []


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_workflow_layout_runs_left_to_right_without_overlaps(path):
    assert wt.layout_problems(_load(path)) == []


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_api_copy_equals_the_converted_ui_workflow(path):
    expected = wt.ui_to_api(_load(path), wt.widget_names())
    assert os.path.exists(wt.api_path(path)), "run: python -m tools.workflows"
    with open(wt.api_path(path), encoding="utf-8") as f:
        text = f.read()
    assert json.loads(text) == expected, "stale API copy; run: python -m tools.workflows"
    assert text == wt.dumps(expected)


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_every_node_type_is_ours_or_a_listed_core_node(path, spec):
    known = set(spec.BY_ID) | set(wt.CORE_NODES)
    assert {n["type"] for n in _load(path)["nodes"]} <= known


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_our_widgets_hold_spec_defaults_and_fixed_seed_controls(path, spec):
    """Prompts and file names aside, our nodes carry the spec's defaults (or the workflow's
    _settings); seeds are 'fixed' (a re-queue must not retrain the abductions)."""
    free = {"source_prompt", "target_prompt", "negative_prompt", "lora_name"}
    settings = _settings(spec, os.path.basename(path))
    seen = set()
    for node in _load(path)["nodes"]:
        if node["type"] not in spec.BY_ID:
            continue
        values = iter(node["widgets_values"])
        for i in spec.BY_ID[node["type"]].inputs:
            if not i.is_widget:
                continue
            value = next(values)
            if (node["type"], i.name) in settings:
                seen.add((node["type"], i.name))
                assert value == settings[node["type"], i.name] != i.default, (node["id"], i.name)
            elif i.name not in free:
                assert value == i.default, (node["id"], i.name)
            if i.control_after_generate:
                assert next(values) == "fixed", (node["id"], i.name)
    assert seen == set(settings)


def test_workflow_contents():
    """What each example is meant to show."""
    def types(name):
        return [n["type"] for n in _load(os.path.join(wt.WORKFLOWS_DIR, name))["nodes"]]

    basic = types("dac_basic_edit.json")
    for t in ("CheckpointLoaderSimple", "LoadImage", "DACAbductUNetLoRA", "DACAbductTextLoRA",
              "DACCounterfactualSample", "VAEDecode", "SaveImage", "LossGraphNode"):
        assert t in basic
    cn = types("dac_controlnet_edit.json")
    for t in ("DACApplyLoRAs", "ControlNetLoader", "Canny", "ControlNetApplyAdvanced", "KSampler"):
        assert t in cn
    # ... and its KSampler starts from an empty latent with the photo's width and height
    api = _api("dac_controlnet_edit.json")
    ks = next(n["inputs"] for n in api.values() if n["class_type"] == "KSampler")
    empty = api[ks["latent_image"][0]]
    assert empty["class_type"] == "EmptyLatentImage" and ks["latent_image"][1] == 0
    size_id = empty["inputs"]["width"][0]
    assert empty["inputs"]["width"] == [size_id, 0] and empty["inputs"]["height"] == [size_id, 1]
    assert api[size_id]["class_type"] == "GetImageSize"
    assert api[api[size_id]["inputs"]["image"][0]]["class_type"] == "LoadImage"
    up = _load(os.path.join(wt.WORKFLOWS_DIR, "dac_edit_then_upscale.json"))
    ks = [n for n in up["nodes"] if n["type"] == "KSampler"]
    assert len(ks) == 1 and ks[0]["widgets_values"][-1] == 0.5
    assert [n["widgets_values"][1] for n in up["nodes"] if n["type"] == "LatentUpscaleBy"] == [1.5]
    share = _load(os.path.join(wt.WORKFLOWS_DIR, "dac_save_and_share.json"))
    lora = [n for n in share["nodes"] if n["type"] == "LoraLoader"]
    assert len(lora) == 1 and lora[0]["widgets_values"][1:] == [1.0, -1.0]
    for t in ("DACSaveLoRA", "DACLoadLoRA", "DACCounterfactualSample", "Note"):
        assert t in [n["type"] for n in share["nodes"]]
    # SDXL: the basic edit on an SDXL checkpoint, the photo scaled to SDXL's ~1 megapixel
    # (aspect ratio kept) before both abductions
    sdxl = types("dac_sdxl_edit.json")
    for t in basic + ["ImageScaleToTotalPixels", "Note"]:
        assert t in sdxl
    api = _api("dac_sdxl_edit.json")
    ids = _ids_by_type(api)
    assert "xl" in api[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"]
    scale = api[ids["ImageScaleToTotalPixels"]]["inputs"]
    assert scale["megapixels"] == 1.0 and scale["image"] == [ids["LoadImage"], 0]
    for t in ("DACAbductUNetLoRA", "DACAbductTextLoRA"):
        assert api[ids[t]]["inputs"]["image"] == [ids["ImageScaleToTotalPixels"], 0]


def _api(name):
    return wt.ui_to_api(_load(os.path.join(wt.WORKFLOWS_DIR, name)), wt.widget_names())


@pytest.mark.parametrize("path", UI_PATHS, ids=_ids(UI_PATHS))
def test_no_full_denoise_sampler_starts_from_the_encoded_photo(path):
    """DAC samples from pure noise; a KSampler at denoise 1 on the VAE-encoded photo starts from the
    photo instead (SD's largest sigma is finite), so every such sampler gets an empty latent."""
    assert wt.photo_latent_problems(wt.ui_to_api(_load(path), wt.widget_names())) == []
    assert wt.photo_latent_problems(_load(wt.api_path(path))) == []


def _ids_by_type(prompt):
    return {node["class_type"]: nid for nid, node in prompt.items()}


def _encode_photo_into(prompt, target_id, input_name="latent_image"):
    """Adds VAE Encode (the photo, the checkpoint's VAE) and feeds it to target_id's input."""
    ids = _ids_by_type(prompt)
    prompt["99"] = {"class_type": "VAEEncode",
                    "inputs": {"pixels": [ids["LoadImage"], 0], "vae": [ids["CheckpointLoaderSimple"], 2]}}
    prompt[target_id]["inputs"][input_name] = ["99", 0]
    return prompt


def test_photo_check_reports_the_encoded_photo_at_full_denoise():
    prompt = _api("dac_controlnet_edit.json")
    ks = _ids_by_type(prompt)["KSampler"]
    bad = _encode_photo_into(copy.deepcopy(prompt), ks)
    problems = wt.photo_latent_problems(bad)
    assert len(problems) == 1 and f"node {ks} (KSampler)" in problems[0] and "node 99 (VAEEncode)" in problems[0]
    bad[ks]["inputs"]["denoise"] = 0.6  # img2img on purpose: allowed
    assert wt.photo_latent_problems(bad) == []
    # through a latent upscale, and with the denoise linked from elsewhere (unknown: counts as 1)
    bad[ks]["inputs"]["denoise"] = ["98", 0]
    bad["97"] = {"class_type": "LatentUpscaleBy",
                 "inputs": {"samples": ["99", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}}
    bad[ks]["inputs"]["latent_image"] = ["97", 0]
    assert len(wt.photo_latent_problems(bad)) == 1


def test_photo_check_knows_ksampler_advanced():
    prompt = _api("dac_controlnet_edit.json")
    ks = _ids_by_type(prompt)["KSampler"]
    bad = _encode_photo_into(copy.deepcopy(prompt), ks)
    inputs = bad[ks]["inputs"]
    bad[ks] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": inputs["model"], "add_noise": "enable", "noise_seed": 29, "steps": 30, "cfg": 4.0,
        "sampler_name": "ddim", "scheduler": "ddim_uniform", "positive": inputs["positive"],
        "negative": inputs["negative"], "latent_image": inputs["latent_image"], "start_at_step": 0,
        "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    assert len(wt.photo_latent_problems(bad)) == 1
    bad[ks]["inputs"]["start_at_step"] = 12  # starts part-way down the schedule: img2img
    assert wt.photo_latent_problems(bad) == []
    bad[ks]["inputs"].update(start_at_step=0, add_noise="disable")
    assert wt.photo_latent_problems(bad) == []


def test_photo_check_lets_the_dac_result_through():
    """Upscale workflow: a second KSampler on the DAC result is fine at any denoise, and Counterfactual
    Sample's latent input sets only the size (it samples from pure noise)."""
    prompt = _api("dac_edit_then_upscale.json")
    ids = _ids_by_type(prompt)
    prompt[ids["KSampler"]]["inputs"]["denoise"] = 1.0
    assert wt.photo_latent_problems(prompt) == []
    _encode_photo_into(prompt, ids["DACCounterfactualSample"], "latent")
    assert wt.photo_latent_problems(prompt) == []
    _encode_photo_into(prompt, ids["KSampler"])
    assert len(wt.photo_latent_problems(prompt)) == 1


def test_sweep_workflow():
    """The two abductions, then DAC Sweep over four betas with the photo in the corner, its grid saved."""
    api = _api("dac_sweep.json")
    ids = _ids_by_type(api)
    sweep = api[ids["DACSweep"]]["inputs"]
    assert sweep["betas"] == "0, 0.5, 1, 1.5" and sweep["target_prompt"] == ""
    assert api[sweep["unet_lora"][0]]["class_type"] == "DACAbductUNetLoRA"
    assert api[sweep["text_lora"][0]]["class_type"] == "DACAbductTextLoRA"
    assert api[sweep["source"][0]]["class_type"] == "LoadImage"
    assert api[ids["SaveImage"]]["inputs"]["images"] == [ids["DACSweep"], 1]  # the grid
    assert wt.load_spec().BY_ID["DACSweep"].input_is_list


def test_ui_to_api_drops_notes_and_control_values_and_keeps_links():
    ui = _load(os.path.join(wt.WORKFLOWS_DIR, "dac_save_and_share.json"))
    api = wt.ui_to_api(ui, wt.widget_names())
    assert "Note" not in {n["class_type"] for n in api.values()}
    ks_id = next(str(n["id"]) for n in ui["nodes"] if n["type"] == "KSampler")
    ks = api[ks_id]["inputs"]
    assert ks["seed"] == 29 and "control_after_generate" not in ks and ks["denoise"] == 1.0
    load_id = next(str(n["id"]) for n in ui["nodes"] if n["type"] == "LoadImage")
    assert api[load_id]["inputs"] == {"image": "example.png"}  # the upload button's "image" is UI-only
    for lid, src, slot, dst, _, _ in ui["links"]:
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        name = next(i["name"] for i in dst_node["inputs"] if i["link"] == lid)
        assert api[str(dst)]["inputs"][name] == [str(src), slot]
    assert wt.ui_to_api(ui, wt.widget_names()) == api  # deterministic


# --- the validator catches broken workflows -------------------------------------------------------

@pytest.fixture
def basic_ui():
    return _load(os.path.join(wt.WORKFLOWS_DIR, "dac_basic_edit.json"))


def test_validator_reports_a_link_of_the_wrong_type(basic_ui):
    bad = copy.deepcopy(basic_ui)
    # feed the checkpoint's CLIP (slot 1) into Counterfactual Sample's MODEL input
    cf = next(n for n in bad["nodes"] if n["type"] == "DACCounterfactualSample")
    lid = next(i["link"] for i in cf["inputs"] if i["name"] == "model")
    link = next(link for link in bad["links"] if link[0] == lid)
    src = next(n for n in bad["nodes"] if n["id"] == link[1])
    src["outputs"][link[2]]["links"].remove(lid)
    link[2], link[5] = 1, "CLIP"
    src["outputs"][1]["links"].append(lid)
    errors = wt.validate_workflow(bad)
    assert any(f"link {lid}" in e and "types disagree" in e for e in errors), errors


def test_validator_reports_a_link_type_label_that_lies(basic_ui):
    bad = copy.deepcopy(basic_ui)
    bad["links"][0][5] = "LATENT"
    errors = wt.validate_workflow(bad)
    assert any(f"link {bad['links'][0][0]}" in e and "types disagree" in e for e in errors), errors


def test_validator_reports_an_unknown_node(basic_ui):
    bad = copy.deepcopy(basic_ui)
    node = next(n for n in bad["nodes"] if n["type"] == "DACAbductTextLoRA")
    node["type"] = node["properties"]["Node name for S&R"] = "DACAbductTextLoRAv2"
    errors = wt.validate_workflow(bad)
    assert any("unknown node type 'DACAbductTextLoRAv2'" in e for e in errors), errors
    with pytest.raises(ValueError, match="unknown node type"):
        wt.ui_to_api(bad, wt.widget_names())


def test_validator_reports_an_unlinked_required_input_and_a_wrong_widget_count(basic_ui):
    bad = copy.deepcopy(basic_ui)
    dec = next(n for n in bad["nodes"] if n["type"] == "VAEDecode")
    lid = next(i["link"] for i in dec["inputs"] if i["name"] == "vae")
    bad["links"] = [link for link in bad["links"] if link[0] != lid]
    for n in bad["nodes"]:
        for o in n["outputs"]:
            if lid in (o["links"] or []):
                o["links"].remove(lid)
    next(i for i in dec["inputs"] if i["name"] == "vae")["link"] = None
    cf = next(n for n in bad["nodes"] if n["type"] == "DACCounterfactualSample")
    cf["widgets_values"].remove("fixed")  # the seed's control value is missing
    errors = wt.validate_workflow(bad)
    assert any("required input 'vae' is not linked" in e for e in errors), errors
    assert any("DACCounterfactualSample" in e and "widgets_values" in e for e in errors), errors


def test_validator_reports_an_unknown_input_name(basic_ui):
    bad = copy.deepcopy(basic_ui)
    unet = next(n for n in bad["nodes"] if n["type"] == "DACAbductUNetLoRA")
    unet["inputs"][3]["name"] = "photo"
    errors = wt.validate_workflow(bad)
    assert any("unknown input 'photo'" in e for e in errors), errors


# --- the node spec -------------------------------------------------------------------------------

def test_spec_node_ids_and_names_are_unique_and_namespaced(spec):
    ids = [n.id for n in spec.NODES]
    names = [n.display_name for n in spec.NODES]
    assert len(ids) == len(set(ids)) and len(names) == len(set(names))
    assert all(i.startswith("DAC") for i in ids)  # no clash with core or other packs' node ids


def test_spec_inputs_have_tooltips_and_nodes_descriptions(spec):
    for node in spec.NODES:
        assert node.description.strip(), node.id
        names = [i.name for i in node.inputs]
        assert len(names) == len(set(names)), node.id
        for i in node.inputs:
            assert isinstance(i.tooltip, str) and i.tooltip.strip(), (node.id, i.name)
        for o in node.outputs:
            assert o.tooltip.strip(), (node.id, o.name)


def test_spec_display_names(spec):
    assert [n.display_name for n in spec.NODES] == [
        "Abduct UNet LoRA", "Abduct Text-Encoder LoRA", "Counterfactual Sample", "DAC Sweep", "Apply DAC LoRAs",
        "Save DAC LoRA", "Load DAC LoRA",
    ]


def _defaults(spec, node_id):
    return {i.name: i.default for i in spec.BY_ID[node_id].inputs}


def test_spec_defaults_follow_the_paper(spec):
    unet = _defaults(spec, "DACAbductUNetLoRA")
    assert (unet["steps"], unet["learning_rate"], unet["rank"]) == (1000, 1e-4, 512)
    text = _defaults(spec, "DACAbductTextLoRA")
    assert (text["steps"], text["rank"], text["eta"]) == (1000, 4, 0.8)
    sample = _defaults(spec, "DACCounterfactualSample")
    assert (sample["eta"], sample["beta"], sample["seed"], sample["steps"], sample["cfg"]) == (0.8, 1.0, 29, 30, 4.0)


def test_spec_widget_defaults_are_in_range(spec):
    for node in spec.NODES:
        for i in node.inputs:
            if i.type in ("INT", "FLOAT") and i.default is not None:
                assert i.min is None or i.default >= i.min, (node.id, i.name)
                assert i.max is None or i.default <= i.max, (node.id, i.name)
            if i.type == "COMBO" and i.options is not None:
                assert i.default in i.options, (node.id, i.name)


def test_nodes_reference_is_current():
    """NODES.md is generated from nodes/spec.py; regenerate it with `python -m tools.nodes_md`."""
    from tools import nodes_md

    with open(nodes_md.PATH, encoding="utf-8") as f:
        assert f.read() == nodes_md.reference_markdown()
