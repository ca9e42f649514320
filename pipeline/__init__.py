"""Train-to-device pipeline for edge defect detection (workstation side; `device/` ships to devices).

Imports nothing: `pipeline/device/` is shipped to Pis and Jetsons together with this file.
"""
