"""Data for megatron-core training: pretraining bin/idx, SFT idxmap and raw-JSON SFT.

Modules (import what you need; nothing heavy is imported here):
  pretrain_preprocess  documents -> <prefix>_<key>_document.{bin,idx}
  sft_build            SFT records -> idxmap (<prefix>_input_ids_document / _labels_document)
  sft_dataset          SFTDataset: idxmap or raw JSON/JSONL, optional packing
  templates            chat templates per generation; sft_records: alpaca/conversation records
  corpus               bundled corpus and SFT samples for quickstarts and tests
"""
