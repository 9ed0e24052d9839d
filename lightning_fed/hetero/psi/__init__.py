"""Private set intersection: align the samples of vertically federated parties.

:func:`intersect` runs the two-party ECDH protocol over a
:class:`~lightning_fed.channel.Channel`; :mod:`.ecdh` holds its pure maths. See
docs/psi.md for the protocol, what each party learns and the measured speed.
"""

from lightning_fed.hetero.psi.align import private_intersection
from lightning_fed.hetero.psi.ecdh import IdLike, InvalidPointError, PsiKey, encode_id, hash_ids
from lightning_fed.hetero.psi.two_party import PsiError, PsiResult, intersect

__all__ = [
    "IdLike",
    "InvalidPointError",
    "PsiError",
    "PsiKey",
    "PsiResult",
    "encode_id",
    "hash_ids",
    "intersect",
    "private_intersection",
]
