"""gansteer's v1 wire protocol: the stubs generated from `protos/gansteer/v1/*.proto` by `protos/generate.py`.

Generated files; do not edit them. Import the modules directly, e.g. `from gansteer.v1 import common_pb2`.
"""
