"""Multi-domain datasets, from a source to the tensors training reads.

Pipeline (:func:`prepare`): read a source -> label ids, domains, train/dev/test -> thin the
training split at ``sample_rate`` -> tokenise -> publish on a store (``_COMPLETE`` marker).

- ``sources.py``: the readers of the four sources (synthetic, amazon, files, hf), column checks;
- ``splits.py``: label ids, the paper's splits, ``sample_rate`` (:func:`load_multidomain`, :func:`subsample`);
- ``containers.py``: :class:`TextSplit`, :class:`MultiDomainData` (raw examples in memory);
- ``vocab.py``: the tokenizer (:func:`build_tokenizer`, deterministic WordPiece training);
- ``encode.py``: :class:`EncodedSplit`, :func:`encode`;
- ``prepared.py``: :class:`PreparedData`, :func:`data_key` (config + contents' fingerprint),
  :func:`data_identity`, :func:`prepare`, :func:`load_prepared`.

May import ``metakd.config``, ``metakd.errors``, ``metakd.storage`` and ``metakd.synthetic``;
nothing that trains.
"""

from ..errors import DataError
from .containers import SPLITS, MultiDomainData, TextSplit
from .encode import EncodedSplit, encode
from .prepared import (CACHE_VERSION, PreparedData, data_identity, data_key, load_prepared, prepare, publish_prepared,
                       write_prepared)
from .sources import SOURCES, fingerprint
from .splits import load_full, load_multidomain, subsample
from .vocab import SPECIAL_TOKENS, build_tokenizer, train_wordpiece_vocab

__all__ = [
    "CACHE_VERSION", "SOURCES", "SPECIAL_TOKENS", "SPLITS", "DataError", "EncodedSplit", "MultiDomainData",
    "PreparedData", "TextSplit", "build_tokenizer", "data_identity", "data_key", "encode", "fingerprint", "load_full",
    "load_multidomain", "load_prepared", "prepare", "publish_prepared", "subsample", "train_wordpiece_vocab",
    "write_prepared",
]
