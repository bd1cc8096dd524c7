"""The prep stage: a folder of face images plus labels -> a clean, deduplicated, split dataset.

Pure work lives in small modules (labels, images, dedupe, splits); `pipeline` applies it with
Ray tasks and writes the output described in `layout`.
"""
