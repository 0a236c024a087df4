"""Seeded Kronecker random projection of the concatenated LoRA gradient to d dimensions (LoGra-style).

For every LoRA matrix m (gradient G_m, shape out x in) we draw P_out (out x k1) and P_in (in x k2), k1*k2 = d,
entries N(0, 1/k), so E[P Pᵀ] = I for P = P_in ⊗ P_out. The feature of the whole gradient is

    φ(g) = Σ_m vec(P_outᵀ G_m P_in)      (row-major vec of a k1 x k2 matrix)

which is Pᵀg for one big random matrix P = [P_1; P_2; ...] of the concatenation: inner products are preserved
in expectation (cross-module terms have mean zero because different modules' factors are independent), yet
the state is Σ_m (out*k1 + in*k2) floats instead of D*d. The small (rank) side of a LoRA matrix has r ≤ 16
dims; when its k equals r we use the identity there (an exact isometry: no variance added), the other side's
Gaussian keeps the modules independent.

Reproducible anywhere: each matrix's factors come from a CPU torch.Generator seeded by a hash of
(seed, canonical matrix name), drawn in float64 (torch's float32 CPU normal_ has a SIMD path that may differ
between CPUs) and rounded to float32, then moved to the device.
"""

from __future__ import annotations

import hashlib
import math

import torch

from grouplora.ml.lora import is_fresh, lora_weights


def module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for (seed, matrix name): the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def split_dims(out_dim: int, in_dim: int, d: int) -> tuple[int, int]:
    """(k1, k2) with k1*k2 = d: the small (rank) side gets the largest divisor of d that fits it."""
    small = min(out_dim, in_dim)
    k_small = max(k for k in range(1, min(small, d) + 1) if d % k == 0)
    return (k_small, d // k_small) if out_dim <= in_dim else (d // k_small, k_small)


class Projection:
    """φ(g) = Pᵀg for the LoRA gradient g, and Δ = P w back in LoRA-weight space."""

    def __init__(self, shapes: dict[str, tuple[int, int]], d: int = 200, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.d, self.seed = d, seed
        self.shapes = dict(shapes)
        self.ks: dict[str, tuple[int, int]] = {}
        self.factors: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for name, (o, i) in self.shapes.items():
            k1, k2 = split_dims(o, i, d)
            g = torch.Generator(device="cpu").manual_seed(module_seed(seed, name))
            # identity on at most one side: the Gaussian on the other keeps this module independent of the rest
            eye_out = k1 == o and k2 != i
            eye_in = k2 == i and not eye_out
            p_out = None if eye_out else torch.randn(o, k1, generator=g, dtype=torch.float64) / math.sqrt(k1)
            p_in = None if eye_in else torch.randn(i, k2, generator=g, dtype=torch.float64) / math.sqrt(k2)
            self.ks[name] = (k1, k2)
            self.factors[name] = (_f32(p_out, device), _f32(p_in, device))

    @classmethod
    def for_model(cls, model: torch.nn.Module, d: int = 200, seed: int = 0, include_a: bool | None = None,
                  device: str | torch.device | None = None) -> "Projection":
        """The projection of `model`'s LoRA gradient. include_a=None: lora_A only if B ≠ 0 (a fresh LoRA has
        B = 0, so dL/dA = 0 and Δ lives on the B matrices alone)."""
        weights = lora_weights(model)
        if include_a is None:
            include_a = not is_fresh(model)
        shapes = {n: tuple(w.shape) for n, w in weights.items() if include_a or n.endswith("lora_B")}
        dev = device if device is not None else next(iter(weights.values())).device
        return cls(shapes, d=d, seed=seed, device=dev)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def dim(self) -> int:
        """D, the length of the concatenated gradient being projected."""
        return sum(o * i for o, i in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for pair in self.factors.values() for p in pair if p is not None)

    def to(self, device: str | torch.device) -> "Projection":
        self.factors = {n: tuple(p.to(device) if p is not None else None for p in pair)
                        for n, pair in self.factors.items()}
        return self

    def project_in(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x (…, in) -> x P_in (…, k2), in float32."""
        p_in = self.factors[name][1]
        return x.float() @ p_in if p_in is not None else x.float()

    def outer(self, name: str, delta: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        """(b, d) features of G_b = Σ_t δ_bt x_btᵀ from δ (b, T, out) and xp = project_in(x) (b, T, k2).

        vec(P_outᵀ G_b P_in) = Σ_t (P_outᵀ δ_bt)(P_inᵀ x_bt)ᵀ: project each side, then one small einsum."""
        p_out = self.factors[name][0]
        a = delta.float() @ p_out if p_out is not None else delta.float()  # (b, T, k1)
        return torch.einsum("btk,btl->bkl", a, xp).reshape(delta.shape[0], self.d)

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """φ of full gradients {name: (out, in) or (b, out, in)} -> (d,) or (b, d)."""
        total = None
        for name in self.names:
            p_out, p_in = self.factors[name]
            g = grads[name].float()
            y = p_out.T @ g if p_out is not None else g
            y = y @ p_in if p_in is not None else y
            y = y.reshape(*g.shape[:-2], self.d)
            total = y if total is None else total + y
        return total

    def unproject(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Δ = P w per matrix (out x in): ⟨φ(g), w⟩ = Σ_m ⟨G_m, Δ_m⟩, so θ0 + Δ moves f by ≈ ⟨φ(g), w⟩."""
        w = torch.as_tensor(w, dtype=torch.float32)
        out = {}
        for name in self.names:
            p_out, p_in = self.factors[name]
            k1, k2 = self.ks[name]
            m = w.to(p_out.device if p_out is not None else p_in.device).reshape(k1, k2)
            m = p_out @ m if p_out is not None else m
            out[name] = m @ p_in.T if p_in is not None else m
        return out

    def checksum(self) -> str:
        """Hash of every factor's bytes: equal checksums = the same projection (e.g. across machines)."""
        h = hashlib.sha256(f"{self.d}|{self.seed}".encode())
        for name in self.names:
            h.update(name.encode())
            for p in self.factors[name]:
                h.update(b"I" if p is None else p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _f32(p: torch.Tensor | None, device: str | torch.device) -> torch.Tensor | None:
    return None if p is None else p.to(torch.float32).to(device)
