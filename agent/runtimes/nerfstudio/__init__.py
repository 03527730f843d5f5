"""The Nerfstudio runtime: a typed pipeline spec run through the real ``ns-*`` commands."""
