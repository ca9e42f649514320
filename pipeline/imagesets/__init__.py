"""Image datasets: the YOLO layout (read, validate, import from YOLO/VOC, write) and the synthetic
defect generator."""
