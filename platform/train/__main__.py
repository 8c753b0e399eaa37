"""`python -m faceforge.train` is `faceforge train`."""

from faceforge.train.app import main

main()
