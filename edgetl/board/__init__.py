"""The device in the loop: what runs on a board reached over SSH (:mod:`edgetl.board.runner`, torch-free) and
what the host does to run it there (:mod:`edgetl.board.host`)."""
