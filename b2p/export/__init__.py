"""`b2p export`: the pixel dataset in the formats other tools train on (COCO, YOLO-seg, semantic PNGs).

`export.py` picks the masks and the images and lays out each format's folder; `instances.py` turns a label
map plus the annotated boxes into one mask per box; `polygons.py` turns a mask into one polygon that
rasterises back close to it (holes and separate parts kept).
"""
