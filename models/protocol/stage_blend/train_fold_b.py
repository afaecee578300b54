"""First stage of "fold B" (session 14): the protocol model's recipe on the development images, validated on
exams that the stage-blend decision never saw (none of the protocol model's 133 validation images, no
protocol test image). Its last epoch is kept (no epoch chosen on the validation images).

    .venv/bin/python models/protocol/stage_blend/train_fold_b.py ../shared/hc18 runs/foldb [--config NAME] [--resume]
It reads the protocol model's validation exams: restore that git-ignored file first with
`git show aa993f2:models/fetalhc_default.pt > models/protocol/fetalhc_protocol.pt`.
Data: HC18 (van den Heuvel et al., PLoS ONE 2018; Zenodo 10.5281/zenodo.1322001; CC BY 4.0).
"""
import random
import sys

import torch

from fetalhc.data import hc18_samples
from fetalhc.model import read_checkpoint
from fetalhc.protocol import protocol_split
from fetalhc.train import TrainConfig, fit

hc18_dir, out = sys.argv[1], sys.argv[2]
config = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "mobilenet_v3_fpn"
torch.set_num_threads(2)
samples = hc18_samples(hc18_dir)
dev = set(protocol_split([s.name for s in samples]).dev)
samples = [s for s in samples if s.name in dev]
seen = set(read_checkpoint("models/protocol/fetalhc_protocol.pt")["data"]["val_exams"])  # chose the blend
fresh = sorted({s.group for s in samples} - seen)
random.Random(14).shuffle(fresh)
val_exams = set(fresh[:len(seen)])  # as many exams as the protocol model validated on
train = [s for s in samples if s.group not in val_exams]
val = [s for s in samples if s.group in val_exams]
print(f"{len(train)} training / {len(val)} validation images ({len(val_exams)} exams, none of the {len(seen)} seen)")
cfg = TrainConfig(out_dir=out, model=config, epochs=12, batch_size=4, lr=1e-3, seed=0,
                  resume="--resume" in sys.argv,
                  data_summary={"source": "HC18 fold B (session 14)", "protocol": True,
                                "license": "HC18 CC BY 4.0, doi:10.5281/zenodo.1322001"})
fit(cfg, train, val)
