-- Orthanc as the PACS: send every stable CT or MR study to triage (modality "TRIAGE" in
-- Orthanc's DicomModalities), as a PACS auto-routing rule would.
function OnStableStudy(studyId, tags, metadata)
  local modalities = tags["ModalitiesInStudy"] or ""
  if string.find(modalities, "CT") or string.find(modalities, "MR") then
    RestApiPost("/modalities/TRIAGE/store", studyId)
  end
end
