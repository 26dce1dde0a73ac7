"""Trust policy and SELinux labelling (issues [3/7] and [5/7]).

Role: nothing yet beyond the package; until the trust policy lands kvmrkt runs only images the operator
imported into the local store by hand. Trust boundary: will own every signature and label decision.
"""
