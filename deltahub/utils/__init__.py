"""Small shared utilities: logging (:mod:`deltahub.utils.logging`) and progress bars (:mod:`deltahub.utils.tqdm`)."""
