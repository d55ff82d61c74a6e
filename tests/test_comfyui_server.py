"""A real ComfyUI server (subprocess, --cpu) runs the pack's API-format workflows.

Needs COMFYUI_PATH (a ComfyUI checkout whose requirements are installed in this Python).
The pack is installed as ComfyUI-Manager installs it: a copy of the repository's files in
custom_nodes/ (plus requirements.txt, which test_requirements.py checks against what the
nodes import). Everything ComfyUI writes goes to a temporary --base-directory, so
COMFYUI_PATH may be read-only. The checkpoints are built by tests/comfy_tiny.py, random
weights: one detected as SD 1.5, and one as SDXL for the SDXL workflow (1.7 GB, its text
encoders at full size; removed when the server stops).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import comfy_tiny
import pytest
from conftest import ROOT, tree_changes, tree_state

COMFYUI = comfy_tiny.comfyui_path()
pytestmark = comfy_tiny.NEEDS_COMFYUI
CKPT = "dac_tiny_sd15.safetensors"
SDXL_CKPT = "dac_tiny_sdxl.safetensors"
# The SDXL workflow scales the photo to 1 megapixel; the tests to the node's least, 0.01
# (10485 pixels: the 64x48 photo becomes 118x89, which the abductions cut to 112x88).
SDXL_MEGAPIXELS = 0.01
CONTROLNET = "dac_tiny_sd15_controlnet.safetensors"
FAST = {"steps": 3, "rank": 4, "preview_every": 2}
FAST_SDXL = {**FAST, "steps": 2}  # its text encoders are full size: each step of Abduction-2 takes seconds
PACK = comfy_tiny.PACK_FOLDER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "server.log")
        self.proc = None

    def start(self):
        log = open(self.log_path, "w")
        # -B: no __pycache__ in COMFYUI_PATH. --base-directory: models/, custom_nodes/, input/,
        # output/, temp/ and user/ under self.base; the database's default is <ComfyUI>/user/.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-B", os.path.join(COMFYUI, "main.py"), "--cpu", "--listen", "127.0.0.1",
             "--port", str(self.port), "--disable-api-nodes", "--base-directory", self.base,
             "--database-url", "sqlite:///" + os.path.join(self.base, "user", "comfyui.db")],
            cwd=self.base, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {open(self.log_path).read()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError("ComfyUI did not start in 180 s")

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, data):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt, timeout=600):
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "dac-tests"})
        assert status == 200, body
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{body['prompt_id']}")
            if body["prompt_id"] in history and history[body["prompt_id"]]["status"].get("completed") is not None:
                entry = history[body["prompt_id"]]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt did not finish in {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy_tiny.import_comfy(COMFYUI)
    base = str(tmp_path_factory.mktemp("comfyui"))
    for sub in ("models/checkpoints", "models/loras", "models/controlnet", "custom_nodes", "input", "output"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    comfy_tiny.save_sd15_checkpoint(os.path.join(base, "models/checkpoints", CKPT))
    comfy_tiny.save_sd15_controlnet(os.path.join(base, "models/controlnet", CONTROLNET))
    sdxl_ckpt = comfy_tiny.save_sdxl_checkpoint(os.path.join(base, "models/checkpoints", SDXL_CKPT))
    pack = comfy_tiny.copy_pack(os.path.join(base, "custom_nodes"))
    assert not os.path.islink(pack) and os.path.isfile(os.path.join(pack, "requirements.txt"))
    from dac_core.tiny import demo_image

    demo_image((64, 48)).save(os.path.join(base, "input", "example.png"))
    before = tree_state(COMFYUI)
    srv = Server(base).start()
    yield srv
    srv.stop()
    os.remove(sdxl_ckpt)  # 1.7 GB; pytest keeps the temporary folders of its last three runs
    log = open(srv.log_path).read()
    ours = [line for line in log.splitlines()
            if PACK in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not ours, log[-3000:]
    assert f"custom_nodes{os.sep}{PACK}" in log, "ComfyUI's log does not list the pack among its custom nodes"
    assert not tree_changes(before, tree_state(COMFYUI)), "the server wrote into COMFYUI_PATH"


def load_api(name: str) -> dict:
    with open(os.path.join(ROOT, "workflows", "api", name)) as f:
        return json.load(f)


def fast(prompt: dict, sdxl: bool = False, **extra) -> dict:
    """The workflow on the test checkpoint (SDXL_CKPT where `sdxl`, the photo scaled to
    SDXL_MEGAPIXELS, FAST_SDXL) with few steps and a small rank."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = SDXL_CKPT if sdxl else CKPT
        if node["class_type"] == "ImageScaleToTotalPixels" and sdxl:
            inputs["megapixels"] = SDXL_MEGAPIXELS
        if node["class_type"] == "ControlNetLoader":
            inputs["control_net_name"] = CONTROLNET
        if node["class_type"].startswith("DAC") or node["class_type"] == "KSampler":
            for k, v in (FAST_SDXL if sdxl else FAST).items():
                if k in inputs:
                    inputs[k] = v
    for node_id, changes in extra.items():
        prompt[node_id]["inputs"].update(changes)
    return prompt


def images_of(entry) -> list[dict]:
    return [img for out in entry["outputs"].values() for img in out.get("images", [])]


def test_pack_loads_with_every_node(server):
    info = server.get("/object_info")
    from tools.workflows import load_spec

    spec = load_spec()
    for node in spec.NODES:
        assert node.id in info, node.id
        assert info[node.id]["display_name"] == node.display_name
        assert info[node.id]["category"] == "DAC"
        declared = {**info[node.id]["input"].get("required", {}), **info[node.id]["input"].get("optional", {})}
        assert [i.name for i in node.inputs] == list(declared)
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK]) == ["dac_basic_edit", "dac_controlnet_edit", "dac_edit_then_upscale",
                                       "dac_save_and_share", "dac_sdxl_edit",
                                       "dac_sweep"]


def test_basic_edit_workflow_and_cache(server):
    prompt = fast(load_api("dac_basic_edit.json"))
    first = server.run(prompt)
    assert first["status"]["status_str"] == "success", first["status"]
    saved = [img for img in images_of(first) if img["type"] == "output"]
    assert saved and os.path.exists(os.path.join(server.base, "output", saved[0]["subfolder"], saved[0]["filename"]))
    # A new target prompt: Abduction-1 comes from ComfyUI's cache, Abduction-2 and sampling run again.
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    second_prompt = copy.deepcopy(prompt)
    second_prompt[ids["DACAbductTextLoRA"]]["inputs"]["target_prompt"] = "A cat wearing a red hat."
    second = server.run(second_prompt)
    assert second["status"]["status_str"] == "success"
    messages = dict((kind, data) for kind, data in second["status"]["messages"])
    cached = set(messages["execution_cached"]["nodes"])
    assert ids["DACAbductUNetLoRA"] in cached
    assert ids["DACAbductTextLoRA"] not in cached and ids["DACCounterfactualSample"] not in cached


@pytest.mark.parametrize("name, size", [("dac_edit_then_upscale.json", (96, 72)),  # 1.5 x the photo
                                        ("dac_controlnet_edit.json", (64, 48)),  # the photo's width x height
                                        ("dac_sweep.json", (996, 366))])  # the grid: 64x48 cells at 3x, 1 + 4 columns
def test_workflow_runs(server, name, size):
    from PIL import Image

    entry = server.run(fast(load_api(name)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [img for img in images_of(entry) if img["type"] == "output"]
    assert len(saved) == 1
    with Image.open(os.path.join(server.base, "output", saved[0]["subfolder"], saved[0]["filename"])) as img:
        assert img.size == size


def test_sdxl_edit_workflow(server):
    """The SDXL workflow as shipped (bf16, gradient checkpointing) on the tiny SDXL checkpoint,
    plus a Save DAC LoRA of its two LoRAs: the text-encoder LoRA has layers on both of SDXL's
    text encoders, so the abductions and the sample ran on SDXL."""
    from PIL import Image
    from safetensors import safe_open

    prompt = fast(load_api("dac_sdxl_edit.json"), sdxl=True)
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    assert prompt[ids["DACAbductUNetLoRA"]]["inputs"]["training_dtype"] == "bf16"
    assert prompt[ids["DACAbductUNetLoRA"]]["inputs"]["gradient_checkpointing"] is True
    prompt["99"] = {"class_type": "DACSaveLoRA", "inputs": {
        "unet_lora": [ids["DACAbductUNetLoRA"], 0], "text_lora": [ids["DACAbductTextLoRA"], 0],
        "filename_prefix": "dac/sdxl_test"}}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [img for img in images_of(entry) if img["type"] == "output"]
    assert len(saved) == 1 and saved[0]["subfolder"] == "dac"
    with Image.open(os.path.join(server.base, "output", saved[0]["subfolder"], saved[0]["filename"])) as img:
        assert img.size == (112, 88)  # the photo at 0.01 megapixels, cut to multiples of 8
    assert entry["outputs"][ids["LossGraphNode"]]["images"]  # Abduction-1's loss, plotted
    with safe_open(os.path.join(server.base, "models/loras/dac/sdxl_test_00001_.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] + "_" for k in keys}
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}, prefixes


def test_save_and_share_workflow(server):
    prompt = fast(load_api("dac_save_and_share.json"))
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    # The loaders need the file that Save DAC LoRA writes: run the saving part first.
    keep = {ids["CheckpointLoaderSimple"], ids["LoadImage"], ids["DACAbductUNetLoRA"], ids["DACAbductTextLoRA"],
            ids["DACSaveLoRA"]}
    entry = server.run({k: v for k, v in prompt.items() if k in keep})
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert os.path.exists(os.path.join(server.base, "models/loras/dac/edit_00001_.safetensors"))
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(images_of(entry)) >= 2  # Load DAC LoRA branch and stock LoraLoader branch


def test_bad_input_is_an_execution_error_and_the_server_keeps_serving(server):
    prompt = fast(load_api("dac_basic_edit.json"))
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    bad = copy.deepcopy(prompt)
    bad[ids["DACAbductUNetLoRA"]]["inputs"]["source_prompt"] = "   "
    entry = server.run(bad)
    assert entry["status"]["status_str"] == "error"
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and "source prompt is empty" in errors[0]["exception_message"]
    assert errors[0]["node_id"] == ids["DACAbductUNetLoRA"]
    assert server.run(prompt)["status"]["status_str"] == "success"


def test_cancel_during_an_abduction(server):
    prompt = fast(load_api("dac_basic_edit.json"))
    ids = {node["class_type"]: nid for nid, node in prompt.items()}
    prompt[ids["DACAbductUNetLoRA"]]["inputs"].update(steps=100000, seed=1)
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "dac-tests"})
    assert status == 200
    time.sleep(8)  # well inside Abduction-1
    started = time.time()
    server.post("/interrupt", {})
    while time.time() - started < 60:
        history = server.get(f"/history/{body['prompt_id']}")
        if body["prompt_id"] in history:
            break
        time.sleep(0.2)
    entry = history[body["prompt_id"]]
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert time.time() - started < 10  # stopped within a step, not after 100000 of them
    assert server.run(fast(load_api("dac_basic_edit.json")))["status"]["status_str"] == "success"
