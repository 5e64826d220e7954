"""`b2p combine`: per class, the best of several mask sources on the calib split.

The recipe runs it twice. `combine`: the teacher's masks against every round-1 candidate's final masks
(`b2p finalize`); the result, the best masks b2p makes from the boxes, teaches the distilled students.
`final`: those combined masks against every distilled student's final masks; the result is what
`b2p export` delivers. Why per class: one source rarely wins every class (thin cracks are often best
served by another student than wide erosion).

Each source is a mask root in the teacher layout (ROOT/<batch>/labelmaps/<key>.png); a box's mask under a
source is that source's pixels of the box's class inside the box (b2p.teach.auto.LabelMapTeacher). Every
source is scored per class on the calib images' manual masks (one confusion matrix, b2p/metrics.py)
and each class takes its best (ties: the earlier source, so the base wins a tie). Without calib masks every
class takes the pool's first member: the student the params list first.

A pool is the models of one params list (`candidates`, `distill`, ...): member NAME's final masks lie in
DIR/NAME/final (the recipe's layout, dvc.yaml); the source is called `<DIR's name>.NAME` (students.bitfit).
"""

from __future__ import annotations

from pathlib import Path

from b2p.errors import B2PError

def combine(
    batch_files: list[Path], sources: dict[str, Path], out: str | Path, fallback: str, progress: bool = True
) -> dict:
    """Score every source per class on calib, teach each class's boxes from its winner into OUT (the teacher
    layout), and write OUT/choice.json; `fallback` names the source of every class without calib masks."""
    from b2p.dataset import class_list_of, load_batches
    from b2p.fileio import write_json_atomic
    from b2p.teach.auto import AutoChoice, AutoTeacher, Candidate, LabelMapTeacher, calib_images, choose, score_candidates
    from b2p.teach.base import teach_batch

    out = Path(out)
    batches = load_batches(batch_files)
    classes = class_list_of(batches)
    names = list(classes.names)
    if fallback not in sources:
        raise B2PError(f"the fallback source {fallback!r} is not one of the sources ({', '.join(sources)})")
    for name, root in sources.items():
        if Path(out).resolve() == Path(root).resolve() or Path(out).resolve() in Path(root).resolve().parents:
            raise B2PError(f"--out would overwrite source {name!r}: give it a folder of its own", out)
    candidates = [Candidate(n, LabelMapTeacher(n, r)) for n, r in sources.items()]
    calib = calib_images(batches)
    if calib:
        scores, n = score_candidates(batches, candidates, progress)
        choice, reason = choose(scores, names)
    else:
        scores, n = {}, 0
        choice, reason = dict.fromkeys(names, fallback), dict.fromkeys(names, "no calib masks: the first pool member")
    decision = AutoChoice(names, n, scores, choice, reason)
    teacher = AutoTeacher(candidates, decision, {c: classes.id_of(c) for c in names})
    for f in batch_files:
        teach_batch(f, out, teacher, resume=False, progress=progress)
    record = {"sources": {k: str(v) for k, v in sources.items()}, **decision.to_json()}
    if not scores:
        record["iou_on_calib"] = None
    write_json_atomic(out / "choice.json", record)
    return record
