"""Lean loading (issue 12, part 3): ``from_pretrained(torch_dtype=...)`` reads the weights tensor by tensor
straight into the target dtype, so the peak resident set while loading is the weights in that dtype plus
10 %, not the file in its saved dtype beside them. A float32 load keeps the memory-mapped file (no copy).

The peak is measured in a fresh process (``memory_probe.run_probe``): VmHWM, reset just before the load.
The fixed allowance is measured in the same process, not assumed: the same architecture at a tiny width
(the same modules, tensors and config; 2-4 MB of weights) is loaded the same way, and its whole peak
increase (Python objects of the module tree, the state dict's dicts, safetensors' header) is what the big
load may add besides its weights. It was 4 MB here (weights included); it is checked to stay under 32 MB.
Measured here: bf16 peak +72 MB for 67 MB of bf16 weights (the old whole-model conversion: +202 MB).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.models import UNet2DConditionModel
from memory_probe import can_measure_rss, run_probe

pytestmark = pytest.mark.skipif(not can_measure_rss(), reason="needs Linux's /proc/self/status and clear_refs")

BLOCKS = dict(in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8, sample_size=16,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
BIG = dict(BLOCKS, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256)  # ~130 MB in float32
TINY = dict(BLOCKS, block_out_channels=(32, 32, 32, 32), cross_attention_dim=32, norm_num_groups=8)
MAX_FIXED = 32 * 2**20

PROBE = """
import gc, json, sys
import torch
from ldmkit.models import UNet2DConditionModel
from memory_probe import reset_peak_rss, rss_status

big, tiny, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
UNet2DConditionModel.from_pretrained(tiny, torch_dtype=dtype)  # warm-up: lazy imports, first-use allocations

def load(folder):
    gc.collect()
    reset_peak_rss()
    before = rss_status()
    model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    after = rss_status()
    return model, {"peak": after["VmHWM"] - before["VmRSS"], "anon": after["RssAnon"] - before["RssAnon"],
                   "weights": sum(t.nbytes for t in model.state_dict().values())}

tiny_model, fixed = load(tiny)
model, loaded = load(big)
torch.save(model.state_dict(), sys.argv[4])
print(json.dumps({"fixed": fixed, "big": loaded}))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    torch.manual_seed(0)
    for name, config in (("big", BIG), ("tiny", TINY)):
        UNet2DConditionModel(**config).save_pretrained(root / name)
    return root


def probe(folders, dtype: str) -> dict:
    out = folders / f"loaded-{dtype}.pt"
    result = run_probe(PROBE, str(folders / "big"), str(folders / "tiny"), dtype, str(out))
    result["state"] = torch.load(out, weights_only=True)
    return result


def test_bf16_load_peaks_at_the_bf16_weights_plus_ten_percent(folders):
    result = probe(folders, "bfloat16")
    fixed, big = result["fixed"], result["big"]
    saved = load_file(str(folders / "big" / "diffusion_pytorch_model.safetensors"))
    assert big["weights"] == sum(t.nbytes for t in saved.values()) // 2 > 50 * 2**20  # big enough to see
    assert 0 <= fixed["peak"] < MAX_FIXED, fixed
    # Converting the whole float32 file at once (the old way) peaked at ~3x the bf16 weights here.
    assert big["peak"] <= 1.1 * big["weights"] + fixed["peak"], (big, fixed)
    state = result["state"]
    assert state.keys() == saved.keys()
    for key, tensor in saved.items():  # exactly the float32 weights rounded to bfloat16, one by one
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], tensor.to(torch.bfloat16)), key


def test_fp32_load_maps_the_file_and_copies_nothing(folders):
    result = probe(folders, "float32")
    big, fixed = result["big"], result["fixed"]
    saved = load_file(str(folders / "big" / "diffusion_pytorch_model.safetensors"))
    assert big["weights"] == sum(t.nbytes for t in saved.values())
    # The weights stay pages of the file's mapping: the anonymous memory hardly grows (no tensor is copied).
    assert big["anon"] <= 0.05 * big["weights"] + max(fixed["anon"], 0), big
    assert big["peak"] <= 1.1 * big["weights"] + fixed["peak"], (big, fixed)
    assert all(torch.equal(result["state"][k], t) for k, t in saved.items())


@pytest.mark.parametrize("saved, loaded", [("float16", "float32"), ("float16", "bfloat16"), ("float32", "float16")])
def test_every_dtype_pair_loads_as_the_whole_model_cast(saved, loaded, tmp_path):
    """Tensor by tensor, sharded or not, equals the old way: the whole saved model cast with ``.to``."""
    torch.manual_seed(1)
    model = UNet2DConditionModel(**TINY).to(getattr(torch, saved))
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="200KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 3
    expected = model.to(getattr(torch, loaded)).state_dict()
    for folder in ("one", "shards"):
        state = UNet2DConditionModel.from_pretrained(tmp_path / folder, torch_dtype=getattr(torch, loaded)).state_dict()
        assert state.keys() == expected.keys()
        assert all(state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]) for k in expected)


def test_a_missing_tensor_is_still_named(folders, tmp_path):
    """Reading lazily changes nothing in the strict check: a file without a key fails before any is read."""
    from safetensors.torch import save_file

    from ldmkit.errors import LDMKitError

    state = load_file(str(folders / "tiny" / "diffusion_pytorch_model.safetensors"))
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((folders / "tiny" / "config.json").read_text())
    with pytest.raises(LDMKitError, match=r"missing 1 keys \(e.g. conv_in.weight\).*unexpected 1 keys \(e.g. extra"):
        UNet2DConditionModel.from_pretrained(tmp_path / "bad", torch_dtype=torch.bfloat16)
