"""QAT under torch.distributed DDP: 2 CPU processes (gloo) fine-tune a tiny fake-quantized LM and stay in sync.

Kept free of transformers so that the spawned workers start quickly."""

import socket
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
from torch import nn

import qkernels.qat
from qkernels.algorithms import QuantConfig, QATScheme


class TinyLM(nn.Module):
    """Embedding -> 2 linears -> output head; returns an object with ``.logits`` like an HF causal LM."""

    def __init__(self, vocab=64, hidden=32):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, 64)
        self.down = nn.Linear(64, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids=None, use_cache=False):
        h = self.embed_tokens(input_ids)
        h = h + self.down(torch.relu(self.up(h)))
        return SimpleNamespace(logits=self.lm_head(h))


def _worker(rank, world, path, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = TinyLM()
        ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
        qkernels.qat.prepare(m, QATScheme(QuantConfig(4, 16, True), act_int8_per_token=True))
        losses = qkernels.qat.finetune(m, ids, steps=3, lr=1e-2, progress=False)
        flat = torch.cat([p.detach().flatten() for p in m.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        with torch.no_grad():
            fq = m(ids).logits
        qkernels.qat.convert(m)
        with torch.no_grad():
            out = m(ids).logits
        if rank == 0:
            torch.save({"params": gathered, "fq": fq, "out": out, "losses": losses}, path)
    finally:
        dist.destroy_process_group()


def test_qat_under_ddp(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, path, port), nprocs=2, join=True)
    res = torch.load(path)
    p0, p1 = res["params"]
    torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # DDP kept the replicas identical
    assert not torch.equal(p0, torch.cat([p.detach().flatten() for p in TinyLM().parameters()]))  # and they trained
    torch.testing.assert_close(res["out"], res["fq"], rtol=1e-5, atol=1e-5)  # convert == fake-quant forward
    assert len(res["losses"]) == 3
