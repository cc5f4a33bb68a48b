"""Tracking kernels: object statistics and overlaps of label blocks, frame-to-frame linking,
gap closing and track numbering. Pure numpy/scipy: no Dask, no zarr.

Objects are nodes ``(frame, id)``: an ID names an object within its frame only, so labels
whose IDs are unique over the video (``predict``'s) and labels whose IDs persist across frames
(a ground truth's) are linked alike.

* :func:`object_statistics` and :func:`overlap_counts` work on one block; their results are
  summed over the blocks of a frame (:func:`sum_objects`, :func:`sum_overlaps`) in exact integer
  arithmetic, so the linking sees the same numbers whatever the block size.
* :func:`link_pair` links the objects of frame t to those of frame t+1: divisions first (one
  object covered by two smaller ones that lie mostly inside it), then a one-to-one assignment
  (Hungarian, :func:`scipy.optimize.linear_sum_assignment`) maximising the overlap (IoU) plus a
  small bonus for a short centroid displacement, which decides where the overlap is ambiguous
  and links objects that moved off their old place.
* :func:`close_gaps` links an object that ends to one that starts up to ``max_gap`` frames
  later, near where it was.
* :func:`number_tracks`: union-find over the links; each chain of links is one track, numbered
  by its first frame, then by its ID there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cellulus_scale.config import TrackingConfig


@dataclass(frozen=True)
class FrameObjects:
    """The objects of one frame: IDs (sorted), areas and centroids (n, dims) in pixels."""

    ids: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)


@dataclass(frozen=True)
class PairOverlap:
    """Pixel overlaps of two frames: object ``a[k]`` of the first shares ``counts[k]`` pixels
    with object ``b[k]`` of the second (indices into the frames' :class:`FrameObjects`)."""

    a: np.ndarray
    b: np.ndarray
    counts: np.ndarray


# --- one block ---------------------------------------------------------------------------------


def object_statistics(
    labels: np.ndarray, origin: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, areas, coordinate sums (n, dims)) of the objects of a block whose first pixel lies
    at global position ``origin``; the sums are exact integers (int64)."""
    labels = np.asarray(labels)
    foreground = labels != 0
    values = labels[foreground]
    dims = labels.ndim
    if values.size == 0:
        return np.zeros(0, labels.dtype), np.zeros(0, np.int64), np.zeros((0, dims), np.int64)
    ids, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.ravel()
    areas = np.bincount(inverse, minlength=ids.size).astype(np.int64)
    sums = np.zeros((ids.size, dims), np.int64)
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = labels.shape[axis]
        position = np.arange(origin[axis], origin[axis] + labels.shape[axis], dtype=np.int64)
        coordinate = np.broadcast_to(position.reshape(shape), labels.shape)[foreground]
        np.add.at(sums[:, axis], inverse, coordinate)
    return ids, areas, sums


def overlap_counts(
    first: np.ndarray, second: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids of ``first``, ids of ``second``, shared pixels) of every overlapping pair of objects
    of two label blocks of the same region."""
    both = (first != 0) & (second != 0)
    a, b = first[both], second[both]
    if a.size == 0:
        return np.zeros(0, first.dtype), np.zeros(0, second.dtype), np.zeros(0, np.int64)
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    keys, counts = np.unique(ia.ravel().astype(np.int64) * ub.size + ib.ravel(), return_counts=True)
    return ua[keys // ub.size], ub[keys % ub.size], counts.astype(np.int64)


# --- one frame, summed over its blocks ---------------------------------------------------------


def sum_objects(
    ids: Sequence[np.ndarray], areas: Sequence[np.ndarray], sums: Sequence[np.ndarray], dims: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks' (ids, areas, coordinate sums) of one frame summed per object (ids sorted)."""
    all_ids = np.concatenate([np.asarray(i, np.uint64) for i in ids]) if ids else np.zeros(0)
    if all_ids.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros((0, dims), np.int64)
    unique, inverse = np.unique(all_ids, return_inverse=True)
    total_areas = np.zeros(unique.size, np.int64)
    np.add.at(total_areas, inverse, np.concatenate(areas).astype(np.int64))
    total_sums = np.zeros((unique.size, dims), np.int64)
    np.add.at(total_sums, inverse, np.concatenate(sums).astype(np.int64).reshape(-1, dims))
    return unique, total_areas, total_sums


def frame_objects(ids: np.ndarray, areas: np.ndarray, sums: np.ndarray) -> FrameObjects:
    """A frame's objects from its summed statistics: centroids are sums / areas."""
    centroids = sums / np.maximum(areas, 1)[:, None] if len(ids) else sums.astype(float)
    return FrameObjects(np.asarray(ids, np.uint64), np.asarray(areas, np.int64), centroids)


def sum_overlaps(
    a_ids: Sequence[np.ndarray], b_ids: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks' overlap triples of one frame pair summed per pair of objects (sorted)."""
    a = np.concatenate([np.asarray(x, np.uint64) for x in a_ids]) if a_ids else np.zeros(0)
    if a.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    b = np.concatenate([np.asarray(x, np.uint64) for x in b_ids])
    pairs, inverse = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True)
    total = np.zeros(len(pairs), np.int64)
    np.add.at(total, inverse.ravel(), np.concatenate(counts).astype(np.int64))
    return pairs[:, 0], pairs[:, 1], total


def pair_overlap(
    first: FrameObjects, second: FrameObjects, a: np.ndarray, b: np.ndarray, counts: np.ndarray
) -> PairOverlap:
    """Overlaps by IDs -> by indices into the two frames' objects."""
    return PairOverlap(
        np.searchsorted(first.ids, np.asarray(a, np.uint64)),
        np.searchsorted(second.ids, np.asarray(b, np.uint64)),
        np.asarray(counts, np.int64),
    )


def typical_diameter(areas: np.ndarray, dims: int) -> float:
    """The diameter of a disc (ball in 3D) of the median object area (volume)."""
    if areas.size == 0:
        return 0.0
    median = float(np.median(areas))
    if dims == 3:
        return 2.0 * (3.0 * median / (4.0 * math.pi)) ** (1.0 / 3.0)
    return 2.0 * math.sqrt(median / math.pi)


# --- linking -------------------------------------------------------------------------------


def assign(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_rows: int, n_cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment of maximal total weight among the candidate pairs (rows[k],
    cols[k]) of positive weight: the Hungarian method on each connected group of candidates.
    Returns the chosen (rows, cols), sorted by row."""
    keep = weights > 0
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(rows.size), (rows, n_rows + cols)), shape=(n_rows + n_cols,) * 2)
    _, component = connected_components(graph, directed=False)
    group = component[rows]
    order = np.argsort(group, kind="stable")
    chosen_rows, chosen_cols = [], []
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    for start, stop in zip(starts, [*starts[1:], order.size], strict=True):
        members = order[start:stop]
        r, c, w = rows[members], cols[members], weights[members]
        if members.size == 1:
            chosen_rows.append(r)
            chosen_cols.append(c)
            continue
        ur, ir = np.unique(r, return_inverse=True)
        uc, ic = np.unique(c, return_inverse=True)
        gain = np.zeros((ur.size, uc.size))
        gain[ir, ic] = w
        picked_r, picked_c = linear_sum_assignment(gain, maximize=True)
        real = gain[picked_r, picked_c] > 0
        chosen_rows.append(ur[picked_r[real]])
        chosen_cols.append(uc[picked_c[real]])
    out_rows = np.concatenate(chosen_rows).astype(np.int64)
    out_cols = np.concatenate(chosen_cols).astype(np.int64)
    order = np.argsort(out_rows, kind="stable")
    return out_rows[order], out_cols[order]


def find_divisions(
    first: FrameObjects, second: FrameObjects, overlap: PairOverlap, parameters: TrackingConfig
) -> np.ndarray:
    """Divisions from ``first`` to ``second``: rows (mother, daughter, daughter) of indices.

    A mother is covered by two objects of the next frame that each lie mostly inside it (more
    inside it than inside any other object), are each smaller than it, together about its size,
    and neither of which overlaps it like a continuation would."""
    p = parameters
    a, b, counts = overlap.a, overlap.b, overlap.counts
    if a.size == 0:
        return np.zeros((0, 3), np.int64)
    inside = counts / second.areas[b]
    # each object of the next frame may be a daughter of the object it lies most inside only
    order = np.lexsort((-inside, b))
    best = order[np.r_[True, b[order][1:] != b[order][:-1]]]
    candidate = np.zeros(a.size, bool)
    candidate[best] = inside[best] >= p.division_inside
    iou = counts / (first.areas[a] + second.areas[b] - counts)
    rows = []
    for mother in np.unique(a[candidate]):
        mine = np.flatnonzero(candidate & (a == mother))
        if mine.size < 2:
            continue
        top = mine[np.lexsort((b[mine], -counts[mine]))[:2]]  # the two largest shares
        area = first.areas[mother]
        daughters = second.areas[b[top]]
        if (
            counts[top].sum() >= p.division_cover * area
            and p.division_area[0] <= daughters.sum() / area <= p.division_area[1]
            and np.all(daughters <= p.division_daughter * area)
            and np.all(iou[top] < p.division_max_iou)
        ):
            pair = np.sort(b[top])
            rows.append([mother, pair[0], pair[1]])
    return np.array(rows, np.int64).reshape(-1, 3)


def link_pair(
    first: FrameObjects, second: FrameObjects, overlap: PairOverlap, parameters: TrackingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Links from frame t (``first``) to frame t+1 (``second``): continuations (k, 2) and
    divisions (m, 3), as indices into the frames' objects."""
    divisions = find_divisions(first, second, overlap, parameters)
    free_a = np.ones(len(first), bool)
    free_b = np.ones(len(second), bool)
    free_a[divisions[:, 0]] = False
    free_b[divisions[:, 1:].ravel()] = False
    p = parameters
    reach = float(p.max_distance or 0.0)
    # candidates: overlapping pairs and pairs of nearby centroids
    a, b, counts = overlap.a, overlap.b, overlap.counts
    iou = counts / (first.areas[a] + second.areas[b] - counts) if a.size else np.zeros(0)
    pairs = {(int(i), int(j)): float(v) for i, j, v in zip(a, b, iou, strict=True)}
    if len(first) and len(second) and reach > 0:
        near = cKDTree(first.centroids).sparse_distance_matrix(
            cKDTree(second.centroids), reach, output_type="ndarray"
        )
        for i, j in zip(near["i"], near["j"], strict=True):
            pairs.setdefault((int(i), int(j)), 0.0)
    if not pairs:
        return np.zeros((0, 2), np.int64), divisions
    keys = np.array(sorted(pairs), np.int64)
    rows, cols = keys[:, 0], keys[:, 1]
    overlap_iou = np.array([pairs[(int(i), int(j))] for i, j in keys])
    distance = np.linalg.norm(first.centroids[rows] - second.centroids[cols], axis=1)
    bonus = p.distance_weight * np.clip(1.0 - distance / max(reach, 1e-9), 0.0, 1.0)
    usable = free_a[rows] & free_b[cols] & ((overlap_iou >= p.min_iou) | (bonus > 0))
    weights = np.where(usable, overlap_iou + bonus, 0.0)
    chosen = assign(rows, cols, weights, len(first), len(second))
    return np.stack(chosen, axis=1).reshape(-1, 2), divisions


def confirm_divisions(
    frames: Sequence[FrameObjects],
    overlaps: Sequence[PairOverlap],
    continuations: Sequence[np.ndarray],
    divisions: Sequence[np.ndarray],
    parameters: TrackingConfig,
) -> tuple[list[np.ndarray], list[np.ndarray], set[tuple[int, int]]]:
    """Drop the divisions whose daughters merge again within ``division_persist`` frames (one
    nucleus cut in two for a frame or two by the segmentation): the mother continues into the
    daughter that goes on. Returns the links and the (frame, index) of each daughter's last
    object before it merged back (not to be taken for a nucleus merged into its neighbour)."""
    p = parameters
    count = len(frames)
    continuations = [np.asarray(c, np.int64).reshape(-1, 2) for c in continuations]
    divisions = [np.asarray(d, np.int64).reshape(-1, 3) for d in divisions]
    successor = [dict(zip(c[:, 0].tolist(), c[:, 1].tolist(), strict=True)) for c in continuations]
    merged_back: set[tuple[int, int]] = set()
    for t in range(count - 1):
        cancelled = []
        for row, (_, d1, d2) in enumerate(divisions[t]):
            chains = [int(d1), int(d2)]
            for k in range(t + 1, min(t + 1 + p.division_persist, count - 1)):
                following = [successor[k].get(c) for c in chains]
                gone = [i for i in (0, 1) if following[i] is None]
                if len(gone) == 1:
                    lost, kept = chains[gone[0]], following[1 - gone[0]]
                    overlap = overlaps[k]
                    shared = overlap.counts[(overlap.a == lost) & (overlap.b == kept)].sum()
                    if shared >= p.division_inside * frames[k].areas[lost]:
                        cancelled.append((row, 1 - gone[0]))
                        merged_back.add((k, lost))
                if gone or following[0] == following[1]:
                    break
                chains = following
        if cancelled:
            keep = np.ones(len(divisions[t]), bool)
            added = []
            for row, which in cancelled:
                keep[row] = False
                added.append((divisions[t][row, 0], divisions[t][row, 1 + which]))
            divisions[t] = divisions[t][keep]
            links = np.concatenate([continuations[t], np.array(added, np.int64)])
            continuations[t] = links[np.argsort(links[:, 0], kind="stable")]
            successor[t] = dict(zip(links[:, 0].tolist(), links[:, 1].tolist(), strict=True))
    return continuations, divisions, merged_back


def resolve_merges(
    frames: Sequence[FrameObjects],
    overlaps: Sequence[PairOverlap],
    continuations: Sequence[np.ndarray],
    divisions: Sequence[np.ndarray],
    parameters: TrackingConfig,
    merged_back: set[tuple[int, int]] = frozenset(),
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int, int, int]]]:
    """Undo what merged segmentations do to the links: (continuations, divisions, links across
    the merged frames as (frame, index, later frame, index)).

    Where an object ends lying mostly inside an object of the next frame that continues another
    track (two nuclei segmented as one), that track remembers it for ``merge_window`` frames.
    When the track splits again within them (what :func:`find_divisions` takes for a division,
    or a new object mostly inside it), the two nuclei are parting: the track continues to the
    part nearer to where it was before the merge, and the absorbed object's track resumes in the
    other part, by a link that skips the merged frames."""
    p = parameters
    count = len(frames)
    continuations = [np.asarray(c, np.int64).reshape(-1, 2) for c in continuations]
    divisions = [np.asarray(d, np.int64).reshape(-1, 3) for d in divisions]
    links: list[tuple[int, int, int, int]] = []
    # per frame: node -> absorbed objects still remembered, (frame, index, frame, predecessor)
    pending: list[dict[int, list[tuple[int, int, int, int]]]] = [{} for _ in range(count)]
    for t in range(count - 1):
        first, second, overlap = frames[t], frames[t + 1], overlaps[t]
        share_next = overlap.counts / np.maximum(second.areas[overlap.b], 1)
        reached = np.zeros(len(second), bool)
        reached[continuations[t][:, 1]] = True
        reached[divisions[t][:, 1:].ravel()] = True
        mothers = {int(m): (int(a), int(b)) for m, a, b in divisions[t]}
        added, dropped = [], set()
        for node in sorted(pending[t]):
            records = pending[t][node]
            if not records:
                continue
            x_frame, x_index, a_frame, a_index = records[-1]
            before = frames[a_frame].centroids[a_index]
            absorbed = frames[x_frame].centroids[x_index]
            if node in mothers:
                d1, d2 = mothers[node]
                c1, c2 = second.centroids[d1], second.centroids[d2]
                straight = np.linalg.norm(before - c1) + np.linalg.norm(absorbed - c2)
                crossed = np.linalg.norm(before - c2) + np.linalg.norm(absorbed - c1)
                keep, other = (d1, d2) if straight <= crossed else (d2, d1)
                dropped.add(node)
                added.append((node, keep))
            else:
                inside = (overlap.a == node) & (share_next >= p.division_inside)
                parts = [int(j) for j in overlap.b[inside] if not reached[j]]
                if not parts:
                    continue
                distance = [np.linalg.norm(absorbed - second.centroids[j]) for j in parts]
                other = parts[int(np.argmin(distance))]
            reached[other] = True
            links.append((x_frame, x_index, t + 1, other))
            records.pop()
        if dropped:
            rows = divisions[t]
            divisions[t] = rows[[int(m) not in dropped for m in rows[:, 0]]]
            continuations[t] = np.concatenate([continuations[t], np.array(added, np.int64)])
            continuations[t] = continuations[t][np.argsort(continuations[t][:, 0], kind="stable")]
        # remembered objects move along the links; those absorbed too long ago are forgotten
        for i, j in continuations[t]:
            kept = [r for r in pending[t].get(int(i), []) if r[0] > t - p.merge_window]
            if kept:
                pending[t + 1][int(j)] = kept
        # new merges: objects that end here, lying mostly inside an object that continues another
        followed = np.zeros(len(first), bool)
        followed[continuations[t][:, 0]] = True
        followed[divisions[t][:, 0]] = True
        predecessor = {int(j): int(i) for i, j in continuations[t]}
        share_first = overlap.counts / np.maximum(first.areas[overlap.a], 1)
        for x in np.flatnonzero(~followed):
            mine = np.flatnonzero(overlap.a == x)
            if mine.size == 0:
                continue
            best = mine[np.argmax(share_first[mine])]
            host = int(overlap.b[best])
            if (
                share_first[best] >= p.division_inside
                and host in predecessor
                and (t, int(x)) not in merged_back
            ):
                record = (t, int(x), t, predecessor[host])
                pending[t + 1].setdefault(host, []).append(record)
    return continuations, divisions, sorted(links)


def close_gaps(
    frames: Sequence[FrameObjects],
    ends: Sequence[np.ndarray],
    starts: Sequence[np.ndarray],
    parameters: TrackingConfig,
) -> list[tuple[int, int, int, int]]:
    """Links (frame, index, later frame, index) across gaps: an object of frame t that no link
    continues (``ends[t]``, indices) to one of frame t+k, 2 <= k <= max_gap + 1, that no link
    reaches (``starts[t+k]``) whose centroid lies within ``max_distance``; one-to-one, the
    shortest gaps first, the nearest objects preferred."""
    p = parameters
    reach = float(p.max_distance or 0.0)
    open_ends = [set(int(i) for i in e) for e in ends]
    open_starts = [set(int(i) for i in s) for s in starts]
    links = []
    if reach <= 0:
        return []
    for gap in range(2, p.max_gap + 2):
        for t in range(len(frames) - gap):
            later = t + gap
            if not open_ends[t] or not open_starts[later]:
                continue
            e = np.array(sorted(open_ends[t]), np.int64)
            s = np.array(sorted(open_starts[later]), np.int64)
            near = cKDTree(frames[t].centroids[e]).sparse_distance_matrix(
                cKDTree(frames[later].centroids[s]), reach, output_type="ndarray"
            )
            if near.size == 0:
                continue
            weights = 1.0 - near["v"] / max(reach, 1e-9) + 1e-6
            rows, cols = assign(
                near["i"].astype(np.int64), near["j"].astype(np.int64), weights, e.size, s.size
            )
            for i, j in zip(e[rows], s[cols], strict=True):
                links.append((t, int(i), later, int(j)))
                open_ends[t].discard(int(i))
                open_starts[later].discard(int(j))
    return sorted(links)


@dataclass(frozen=True)
class Tracks:
    """Track IDs of every object (``node_tracks``, aligned with the video's nodes: frame 0's
    objects first, in ID order) and the track table rows (id, first frame, last frame,
    parent id or 0), sorted by id."""

    node_tracks: np.ndarray
    table: np.ndarray


def number_tracks(
    frames: Sequence[FrameObjects],
    continuations: Sequence[np.ndarray],
    divisions: Sequence[np.ndarray],
    gaps: Sequence[tuple[int, int, int, int]],
) -> Tracks:
    """Union-find over the continuation and gap links (scipy's connected components): each
    chain of links is one track. Tracks are numbered 1..N by (first frame, the object's ID
    there); a division's daughters start tracks whose parent is the mother's track."""
    offsets = np.cumsum([0, *[len(f) for f in frames]])
    n = int(offsets[-1])
    sources = [
        offsets[t] + np.asarray(links, np.int64).reshape(-1, 2)[:, 0]
        for t, links in enumerate(continuations)
    ]
    targets = [
        offsets[t + 1] + np.asarray(links, np.int64).reshape(-1, 2)[:, 1]
        for t, links in enumerate(continuations)
    ]
    sources += [np.array([offsets[t] + i for t, i, _, _ in gaps], np.int64)]
    targets += [np.array([offsets[later] + j for _, _, later, j in gaps], np.int64)]
    source, target = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(source.size), (source, target)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # a track's first node has the smallest node index (nodes are ordered by frame, then ID):
    # ordering the components by it orders the tracks by (first frame, ID there)
    first_node = np.full(component.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(first_node, component, np.arange(n))
    rank = np.empty_like(first_node)
    rank[np.argsort(first_node, kind="stable")] = np.arange(first_node.size)
    node_tracks = rank[component] + 1
    frame_of = np.repeat(np.arange(len(frames)), np.diff(offsets))
    count = first_node.size
    first = np.full(count, np.iinfo(np.int64).max)
    last = np.full(count, -1, np.int64)
    np.minimum.at(first, node_tracks - 1, frame_of)
    np.maximum.at(last, node_tracks - 1, frame_of)
    parents = np.zeros(count, np.int64)
    for t, rows in enumerate(divisions):
        for mother, d1, d2 in np.asarray(rows, np.int64).reshape(-1, 3):
            for daughter in (d1, d2):
                parents[node_tracks[offsets[t + 1] + daughter] - 1] = node_tracks[
                    offsets[t] + mother
                ]
    table = np.stack([np.arange(1, count + 1), first, last, parents], axis=1)
    return Tracks(node_tracks.astype(np.int64), table.astype(np.int64).reshape(-1, 4))
