# one-off device probe kept with its results (2026-11-30_clocks_720p_h200.*): SM clock and power per mode
# (reference vs patched), 720p forwards
import json, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
import wan_triton
from wan.configs import T2V_A14B
from wan.dit import WanModel
dev = torch.device("cuda")
model = WanModel.from_config(T2V_A14B.dit, device=dev, dtype=torch.bfloat16, seed=0, zero_head=False)
g = torch.Generator(device=dev).manual_seed(1)
lat = (16, 21, 90, 160); L = 21 * 90 * 160 // 4
x = torch.randn(1, *lat, device=dev, generator=g)
ctx = torch.randn(1, 60, 4096, device=dev, generator=g).bfloat16()
t = torch.tensor([900], device=dev)
def fwd():
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return model(x, t, ctx, seq_len=L)
iv = []
for mode in ("reference", "patched", "reference", "patched"):
    wan_triton.unpatch()
    if mode == "patched":
        wan_triton.patch(strict=True)
    fwd(); torch.cuda.synchronize()
    for i in range(1):
        t0 = time.time(); fwd(); torch.cuda.synchronize(); t1 = time.time()
        iv.append(dict(mode=mode, start=t0, end=t1, s=t1 - t0)); print(mode, round(t1 - t0, 3), flush=True)
json.dump(iv, open(os.environ["OUT"] + "/intervals.json", "w"), indent=1)
