"""Which contiguous blocks of layers to try removing for a cut of a given size.

Removing the deepest layers costs least before healing, but the cheapest cut to prune is not
always the best to heal (docs/healing.md): a block that keeps the last layer leaves the student
the teacher's own last layer. The candidates for a size are the block that ends at the last
layer, then the same block shifted one layer earlier at a time.
"""

from __future__ import annotations

from tailor.prune.pruning import PruneError


def contiguous_cuts(num_layers: int, size: int, candidates: int) -> list[list[int]]:
    """Up to ``candidates`` blocks of ``size`` layers: ``[L-size .. L-1]``, ``[L-size-1 .. L-2]``, ...,
    never reaching layer 0 (the first layer reads the embedding and is kept)."""
    if not 1 <= size < num_layers - 1:
        raise PruneError(
            f"frontier.sizes: a cut of {size} layers does not fit a {num_layers}-layer model while keeping its "
            f"first layer and one more; allowed: 1..{num_layers - 2}"
        )
    cuts = []
    for shift in range(candidates):
        first = num_layers - size - shift
        if first < 1:
            break
        cuts.append(list(range(first, first + size)))
    return cuts
