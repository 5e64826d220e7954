"""Final masks for the box-annotated images: student (and teacher) blended per box, settings chosen on calib."""
