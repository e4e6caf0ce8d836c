"""Set operations on Arrow tables keyed by (uri, etag): what is new, what is done, each once."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc


def _keys(table: pa.Table) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(table["uri"], table["etag"], "\x00")


def _in_right(left: pa.Table, right: pa.Table) -> pa.ChunkedArray:
    """Whether each row of `left` has its (uri, etag) in `right`; order and columns kept."""
    return pc.is_in(_keys(left), value_set=_keys(right).combine_chunks())


def anti_join(left: pa.Table, right: pa.Table) -> pa.Table:
    """Rows of `left` whose (uri, etag) is not in `right`."""
    if len(right) == 0 or len(left) == 0:
        return left
    return left.filter(pc.invert(_in_right(left, right)))


def semi_join(left: pa.Table, right: pa.Table) -> pa.Table:
    """Rows of `left` whose (uri, etag) is in `right`."""
    if len(right) == 0 or len(left) == 0:
        return left.slice(0, 0)
    return left.filter(_in_right(left, right))


def first_per_key(rows: pa.Table, keys: Sequence[str] = ("uri", "etag")) -> pa.Table:
    """The first row of each distinct `keys`, in their original order (the table itself when no
    key repeats)."""
    if rows.num_rows < 2:
        return rows
    numbered = rows.select(list(keys)).append_column(
        "_row", pa.array(range(rows.num_rows), pa.int64())
    )
    first = numbered.group_by(list(keys), use_threads=False).aggregate([("_row", "min")])
    if first.num_rows == rows.num_rows:
        return rows
    kept = first["_row_min"]  # row numbers of `rows`, in group order
    return rows.take(pc.take(kept, pc.sort_indices(kept)))
