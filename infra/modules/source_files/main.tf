# The files of dicomflow/ that the function archive ships, relative to dicomflow/. No provider and
# no resource, only an input, locals and an output: Terraform computes the list offline, with no
# credentials (tests/unit/test_archive.py applies a root that calls this module alone).
#
# Left out:
# - dicomflow/ops/: the operator tools (the CLI, status and its page, tables, re-drive, resolve,
#   erase ...). They run on an operator's machine; no function imports them.
# - dicomflow/__main__.py: `python -m dicomflow`, the CLI's entry.
# - bytecode (__pycache__/, *.pyc) left by a local run.

variable "root" {
  description = "The repository root: the directory holding main.py, requirements.txt and dicomflow/."
  type        = string
}

locals {
  package = "${var.root}/dicomflow"

  operator_only = setunion(fileset(local.package, "ops/**"), fileset(local.package, "__main__.py"))
  bytecode      = setunion(fileset(local.package, "**/__pycache__/**"), fileset(local.package, "**/*.pyc"))

  package_files = sort(setsubtract(fileset(local.package, "**"), setunion(local.operator_only, local.bytecode)))
}

output "package_files" {
  description = "The shipped files of dicomflow/, relative to it, sorted."
  value       = local.package_files
}
