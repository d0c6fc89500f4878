"""Shared pieces of the training tests (imported by test_fastgen and test_fasttrain): small seeded chat rows,
and the check that two trainings ended with the same LoRA adapters."""
import torch

from emlib.adapters import lora_modules


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` user/assistant rows of 2-7 / 3-14 words drawn (seeded) from a ten-word medical vocabulary."""
    g = torch.Generator().manual_seed(seed)
    words = ["pain", "take", "doctor", "rest", "water", "dose", "fever", "daily", "sleep", "avoid"]

    def text(k):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))

    return [{"messages": [{"role": "user", "content": text(int(torch.randint(2, 8, (1,), generator=g)))},
                          {"role": "assistant", "content": text(int(torch.randint(3, 15, (1,), generator=g)))}]}
            for _ in range(n)]


def assert_same_adapters(ref_model, got_model) -> None:
    """Every LoRA module of ``got_model`` equals ``ref_model``'s (A and B, rtol 1e-3, atol 1e-5), and the adapters
    really trained (B is not all zero). Adam divides by the root of the squared gradient: near-zero entries
    magnify rounding, hence the tolerances."""
    moved = 0.0
    for m1, m2 in zip(lora_modules(ref_model), lora_modules(got_model)):
        assert m1.name == m2.name
        torch.testing.assert_close(m2.A, m1.A, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(m2.B, m1.B, rtol=1e-3, atol=1e-5)
        moved += float(m2.B.detach().abs().sum())
    assert moved > 0  # the adapters really trained
