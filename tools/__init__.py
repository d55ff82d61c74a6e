"""Maintainer scripts: regenerate the workflows' API copies and NODES.md, and the helpers the
tests share with them. Not part of the installed package."""
