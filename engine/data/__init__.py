"""Data for the task front ends: arrow writers for the published formats, the
text tokenizer, the image transform and torch datasets over the arrow files.

Run the writers with ``python -m engine.data {vqav2,coco,f30k,nlvr2} --root RAW --out ARROW``.
"""
