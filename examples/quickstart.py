"""A cheap ensemble in twenty lines: 4 members on one frozen ResNet-20, scikit-learn's 8x8 digits.

    python examples/quickstart.py          # about a minute on 2 CPU cores
"""
import torch

import shared_backbone as sb
from shared_backbone.data import TensorData, load_task, load_arrays
from shared_backbone.metrics import evaluate_ensemble
from shared_backbone.train import TrainConfig, fit, predict

torch.set_num_threads(2)
card = load_task("digits")  # 1,797 real digits shipped with scikit-learn, resized to 28x28
train = TensorData.from_uint8(*load_arrays(card, "train"), card.mean, card.std, crop_padding=2)
test = TensorData.from_uint8(*load_arrays(card, "test"), card.mean, card.std)

frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=8, in_channels=1, num_classes=10), seed=0)
spec = sb.Filters(0.25) + sb.BatchNorm() + sb.Head()
print(sb.describe(frozen, spec, members=4))  # per-stage parameters, learned and stored

ens = sb.Ensemble(frozen, spec, members=4)  # ens(x): (N, 1, 28, 28) -> (4, N, 10)
fit(ens, train, None, TrainConfig(epochs=3, batch_size=64, lr=0.05), progress=False)
report = evaluate_ensemble(predict(ens, test), test.y)
print(f"members: {[round(a, 3) for a in report['member_accuracy']]}  ensemble: {report['accuracy']:.3f}")

plain = ens.member(0).eval()  # a plain nn.Module with member 0's merged weights
with torch.no_grad():
    assert torch.allclose(plain(test.x[:8]), ens.eval()(test.x[:8])[0], atol=1e-5)
