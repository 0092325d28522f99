# Identity. One service account per function; every grant below comes from local.functions in
# main.tf and lands on the one bucket, topic, DICOM store or dataset it is about. No primitive
# roles, no project-level storage roles. Healthcare permissions are custom roles because the
# narrowest predefined role with dicomStores.import/export (roles/healthcare.dicomStoreAdmin)
# also carries delete, setIamPolicy and every DICOMweb write.

resource "google_service_account" "fn" {
  for_each     = local.functions
  account_id   = "${var.name_prefix}-${each.key}"
  display_name = "dicomflow ${each.key} function"
  description  = "Runtime and trigger identity of the ${each.key} function: ${each.value.trigger}."
}

locals {
  buckets_by_role = {
    landing = google_storage_bucket.landing.name
    staging = google_storage_bucket.staging.name
    backups = google_storage_bucket.backups.name
  }
  topics_by_role = {
    alerts = google_pubsub_topic.alerts.id
  }

  bucket_grants = {
    for g in flatten([
      for fn, spec in local.functions : [
        for bucket, roles in spec.bucket_roles : [
          for role in roles : { fn = fn, bucket = local.buckets_by_role[bucket], role = role, key = "${fn}/${bucket}/${role}" }
        ]
      ]
    ]) : g.key => g
  }

  manifest_grants = {
    for g in flatten([
      for fn, spec in local.functions : [
        for role in spec.manifest_roles : { fn = fn, role = role, key = "${fn}/${role}" }
      ]
    ]) : g.key => g
  }

  topic_grants = {
    for g in flatten([
      for fn, spec in local.functions : [
        for topic, roles in spec.topic_roles : [
          for role in roles : { fn = fn, topic = local.topics_by_role[topic], role = role, key = "${fn}/${topic}/${role}" }
        ]
      ]
    ]) : g.key => g
  }

  project_grants = merge([
    for fn, spec in local.functions : {
      for role in spec.project_roles : "${fn}/${role}" => { fn = fn, role = role }
    }
  ]...)

  store_roles   = { for fn, spec in local.functions : fn => spec.store_permissions if length(spec.store_permissions) > 0 }
  drill_roles   = { for fn, spec in local.functions : fn => spec.drill_store_permissions if local.drill_on && length(spec.drill_store_permissions) > 0 }
  dataset_roles = { for fn, spec in local.functions : fn => spec.dataset_permissions if length(spec.dataset_permissions) > 0 }

  # The DICOM store and dataset as the IAM resources expect them (project/location/dataset[/store]).
  dataset_iam_id = "${var.project_id}/${local.healthcare_location}/${var.dataset_id}"
  store_iam_id   = "${local.dataset_iam_id}/${var.dicom_store_id}"
  drill_iam_id   = "${local.dataset_iam_id}/${local.drill_store_id}"
}

# --- Cloud Storage: bucket-level grants only ---

resource "google_storage_bucket_iam_member" "fn" {
  for_each = local.bucket_grants
  bucket   = each.value.bucket
  role     = each.value.role
  member   = google_service_account.fn[each.value.fn].member
}

# Backup manifests only: an IAM condition limits these grants to PREFIX/**/_MANIFEST.json, so the
# functions can write and replace manifests but never delete or overwrite exported data.
resource "google_storage_bucket_iam_member" "fn_manifests" {
  for_each = local.manifest_grants
  bucket   = google_storage_bucket.backups.name
  role     = each.value.role
  member   = google_service_account.fn[each.value.fn].member

  condition {
    title       = "dicomflow-backup-manifests"
    description = "Only the _MANIFEST.json objects of dated backup folders."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.backups.name}/objects/${var.backup_prefix}/\") && resource.name.endsWith(\"/_MANIFEST.json\")"
  }
}

# --- Pub/Sub: topic-level grants only ---

resource "google_pubsub_topic_iam_member" "fn" {
  for_each = local.topic_grants
  topic    = each.value.topic
  role     = each.value.role
  member   = google_service_account.fn[each.value.fn].member
}

# --- Healthcare: custom roles, granted on the DICOM store or the dataset ---

resource "google_project_iam_custom_role" "store" {
  for_each    = local.store_roles
  role_id     = "${replace(var.name_prefix, "-", "_")}_${each.key}_store"
  title       = "dicomflow ${each.key}: DICOM store"
  description = "What the dicomflow ${each.key} function does on its DICOM store; granted on the store only."
  permissions = each.value
}

resource "google_project_iam_custom_role" "dataset" {
  for_each    = local.dataset_roles
  role_id     = "${replace(var.name_prefix, "-", "_")}_${each.key}_operations"
  title       = "dicomflow ${each.key}: dataset operations"
  description = "Long-running operations the dicomflow ${each.key} function reads; granted on the dataset only."
  permissions = each.value
}

resource "google_healthcare_dicom_store_iam_member" "fn" {
  for_each       = local.store_roles
  dicom_store_id = local.store_iam_id
  role           = google_project_iam_custom_role.store[each.key].name
  member         = google_service_account.fn[each.key].member

  depends_on = [google_healthcare_dicom_store.this]
}

resource "google_project_iam_custom_role" "drill" {
  for_each    = local.drill_roles
  role_id     = "${replace(var.name_prefix, "-", "_")}_${each.key}_drill"
  title       = "dicomflow ${each.key}: restore drill store"
  description = "Restore a sample into the scratch DICOM store, compare it and empty it; granted on that store only."
  permissions = each.value
}

resource "google_healthcare_dicom_store_iam_member" "drill" {
  for_each       = local.drill_roles
  dicom_store_id = local.drill_iam_id
  role           = google_project_iam_custom_role.drill[each.key].name
  member         = google_service_account.fn[each.key].member

  depends_on = [google_healthcare_dicom_store.drill]
}

resource "google_healthcare_dataset_iam_member" "fn" {
  for_each   = local.dataset_roles
  dataset_id = local.dataset_iam_id
  role       = google_project_iam_custom_role.dataset[each.key].name
  member     = google_service_account.fn[each.key].member

  depends_on = [google_healthcare_dataset.this]
}

# --- Landing clean-up: delete only, on the landing bucket only, only when it is turned on ---

# roles/storage.objectUser would also let ingest create and overwrite uploads; this role holds the
# one permission the clean-up needs.
resource "google_project_iam_custom_role" "landing_delete" {
  count       = var.landing_delete_after_days > 0 ? 1 : 0
  role_id     = "${replace(var.name_prefix, "-", "_")}_landing_delete"
  title       = "dicomflow ingest: delete landing objects"
  description = "Delete landing objects that were imported and verified; granted on the landing bucket only."
  permissions = ["storage.objects.delete"]
}

resource "google_storage_bucket_iam_member" "ingest_landing_delete" {
  count  = var.landing_delete_after_days > 0 ? 1 : 0
  bucket = google_storage_bucket.landing.name
  role   = google_project_iam_custom_role.landing_delete[0].name
  member = google_service_account.fn["ingest"].member
}

# --- Project level: only what cannot be granted lower ---

resource "google_project_iam_member" "fn" {
  for_each = local.project_grants
  project  = var.project_id
  role     = each.value.role
  member   = google_service_account.fn[each.value.fn].member
}

# Eventarc's Cloud Storage triggers publish through Pub/Sub as the Cloud Storage service agent.
data "google_storage_project_service_account" "this" {
  project = var.project_id
}

resource "google_project_iam_member" "storage_agent_publisher" {
  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = data.google_storage_project_service_account.this.member
}

# --- Invokers: each trigger's identity may call its own function's Cloud Run service, only ---

resource "google_cloud_run_v2_service_iam_member" "invoker" {
  for_each = local.functions
  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.fn[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.fn[each.key].member
}

# --- The Cloud Healthcare Service Agent, which runs imports and exports ---

# Import reads gs://STAGING/batches/<id>/**.dcm (list + get); export reads its filter file there.
resource "google_storage_bucket_iam_member" "healthcare_agent_staging" {
  bucket = google_storage_bucket.staging.name
  role   = "roles/storage.objectViewer"
  member = local.healthcare_agent

  depends_on = [google_healthcare_dataset.this]
}

# Export writes gs://BACKUPS/PREFIX/DATE/... (and the drill imports from there). The
# dicomStores.export reference asks for roles/storage.objectAdmin on the destination; an IAM
# condition limits it to objects under PREFIX/ and to listings of that prefix, so the agent, and so
# any export someone starts, cannot touch the rest of the bucket. Under the retention policy it can
# create objects there but not overwrite or delete them.
resource "google_storage_bucket_iam_member" "healthcare_agent_backups" {
  bucket = google_storage_bucket.backups.name
  role   = "roles/storage.objectAdmin"
  member = local.healthcare_agent

  condition {
    title       = "dicomflow-backup-prefix"
    description = "Only objects under the backup prefix, and listings of it."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.backups.name}/objects/${var.backup_prefix}/\") || api.getAttribute(\"storage.googleapis.com/objectListPrefix\", \"\").startsWith(\"${var.backup_prefix}/\")"
  }

  depends_on = [google_healthcare_dataset.this]
}
