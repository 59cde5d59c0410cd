"""tmem_host.store: the in-memory tmem page store behind tmemd (pure, no I/O)."""

from .pagecodec import EncodedPages, EncodingJob, PageEncoder, decode_page, decode_pages, encode_page, encode_pages
from .store import (
    DEFAULT_WEIGHT,
    INVALID_UUID,
    MAX_POOLS_PER_CLIENT,
    MAX_SHARED_POOLS,
    DEDUP_BLOB_OVERHEAD_BYTES,
    EPHEMERAL_PAGE_OVERHEAD_BYTES,
    OBJECT_OVERHEAD_BYTES,
    PERSISTENT_PAGE_OVERHEAD_BYTES,
    Client,
    Pool,
    Store,
    page_overhead_bytes,
)

__all__ = [
    "DEFAULT_WEIGHT",
    "INVALID_UUID",
    "MAX_POOLS_PER_CLIENT",
    "MAX_SHARED_POOLS",
    "DEDUP_BLOB_OVERHEAD_BYTES",
    "EPHEMERAL_PAGE_OVERHEAD_BYTES",
    "OBJECT_OVERHEAD_BYTES",
    "PERSISTENT_PAGE_OVERHEAD_BYTES",
    "Client",
    "EncodedPages",
    "EncodingJob",
    "PageEncoder",
    "Pool",
    "Store",
    "decode_page",
    "decode_pages",
    "encode_page",
    "encode_pages",
    "page_overhead_bytes",
]
