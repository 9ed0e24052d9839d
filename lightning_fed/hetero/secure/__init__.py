"""Secure HeteroNN: collaborators' features reach the host only CKKS-encrypted.

- :class:`SecureHeteroNNModule` is a party's model (a HeteroNN module with a
  projection layer split between the host and each collaborator);
- :class:`CKKSParams` are a collaborator's CKKS parameters (128-bit secure);
- :mod:`.interactive` is the layer's arithmetic, :mod:`.packing` its packed products,
  :mod:`.link` the exchange, :mod:`.ckks` the keys (TenSEAL).
"""

from lightning_fed.hetero.secure.ckks import MAX_COEFF_BITS_128, CKKSError, CKKSParams
from lightning_fed.hetero.secure.module import SecureHeteroNNModule

__all__ = ["MAX_COEFF_BITS_128", "CKKSError", "CKKSParams", "SecureHeteroNNModule"]
