from collections.abc import Callable, Mapping, Sequence

def batch_records(pool_id: int, keys: Sequence[tuple[tuple[int, int, int], int]], statuses: Sequence[int],
                  objects: Mapping[tuple[int, int, int], Mapping[int, object]], ok: int, invalid: int,
                  special: Callable[[tuple[int, int, int], int, object], bytes]) -> tuple[bytes, int]: ...
def object_records(pool_id: int, oid: tuple[int, int, int], pages: Mapping[int, object],
                   special: Callable[[tuple[int, int, int], int, object], bytes],
                   position: int, limit: int) -> tuple[bytes, int, int | None]: ...
